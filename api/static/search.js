// The search page: text search, category filter, image search (file picker or drop), results grid, record view
// with "more like this". Talks only to this API's JSON routes.
import { api, appUrl, categoryLabel, el, fmt, loadHeader, setStatus } from './common.js';

const $ = (id) => document.getElementById(id);
const form = $('search-form');
const q = $('q');
const category = $('category');
const topK = $('top-k');
const fileInput = $('image-file');
const statusLine = $('status');
const results = $('results');
const queryImage = $('query-image');
const overlay = $('drop-overlay');
const dialog = $('record-view');
const recordBody = $('record-body');
const recordStatus = $('record-status');
const moreLikeThis = $('more-like-this');

let categories = {};
let seq = 0; // only the latest request may render
let openRecordId = null;
let openedFrom = null;
let queryImageUrl = null;

function topKValue() {
  const k = Number.parseInt(topK.value, 10);
  if (!Number.isInteger(k) || k < 1 || k > 100) {
    throw new Error('The number of results must be between 1 and 100.');
  }
  return k;
}

function categoryValue() {
  const v = category.value;
  if (!v) return null;
  return v === 'unlabelled' ? v : Number(v);
}

function categoryText() {
  const v = category.value;
  return v ? ` in ${category.options[category.selectedIndex].text}` : '';
}

function busy(on) {
  results.setAttribute('aria-busy', on ? 'true' : 'false');
  $('search-button').disabled = on;
  document.body.classList.toggle('loading', on);
}

function hitCard(hit) {
  const img = el('img', {
    src: appUrl(hit.image_url), alt: hit.designation, width: 240, height: 240, loading: 'lazy', decoding: 'async',
  });
  const button = el('button', { type: 'button', class: 'hit', dataset: { record: hit.record_id } },
    img,
    el('span', { class: 'designation' }, hit.designation),
    el('span', { class: 'category' }, categoryLabel(hit.prdtypecode, hit.category)),
    el('span', { class: 'scores' },
      el('span', { title: 'cosine similarity of the query and the image' }, `score ${fmt(hit.score)}`),
      el('span', { title: "cosine similarity of this product's image and text" }, `alignment ${fmt(hit.alignment_score)}`)),
  );
  button.addEventListener('click', () => openRecord(hit.record_id, button));
  return el('li', {}, button);
}

async function run(describeQuery, request) {
  const mine = ++seq;
  busy(true);
  setStatus(statusLine, 'loading', `Searching ${describeQuery}…`);
  try {
    const hits = await request();
    if (mine !== seq) return;
    if (!headerLoaded) refreshHeader();  // opened while nothing was served: the banner and filters catch up
    results.replaceChildren(...hits.map(hitCard));
    if (hits.length === 0) {
      setStatus(statusLine, 'empty', `No results ${describeQuery}.`);
    } else {
      setStatus(statusLine, 'info', `${hits.length} result${hits.length === 1 ? '' : 's'} ${describeQuery}.`);
    }
  } catch (e) {
    if (mine !== seq) return;
    results.replaceChildren();
    setStatus(statusLine, 'error', e.message);
  } finally {
    if (mine === seq) busy(false);
  }
}

function showQueryImage(file) {
  if (queryImageUrl) URL.revokeObjectURL(queryImageUrl);
  if (!file) {
    queryImage.hidden = true;
    queryImage.replaceChildren();
    queryImageUrl = null;
    return;
  }
  queryImageUrl = URL.createObjectURL(file);
  queryImage.replaceChildren(
    el('img', { src: queryImageUrl, alt: `query image ${file.name}`, width: 64, height: 64 }),
    el('span', {}, `Image query: ${file.name}`));
  queryImage.hidden = false;
}

function textSearch() {
  const query = q.value.trim();
  if (!query) {
    setStatus(statusLine, 'error', 'Type something to search for, or choose or drop an image.');
    q.focus();
    return;
  }
  let k;
  try {
    k = topKValue();
  } catch (e) {
    setStatus(statusLine, 'error', e.message);
    topK.focus();
    return;
  }
  showQueryImage(null);
  run(`for “${query}”${categoryText()}`, () => api('/search', {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', Accept: 'application/json' },
    body: JSON.stringify({ query, top_k: k, category: categoryValue() }),
  }));
}

/** The top-k field's value, or null after showing why it is not valid. */
function checkedTopK() {
  try {
    return topKValue();
  } catch (e) {
    setStatus(statusLine, 'error', e.message);
    return null;
  }
}

function imageSearch(file) {
  const k = checkedTopK();
  if (k === null) return;
  showQueryImage(file);
  const data = new FormData();
  data.append('file', file, file.name);
  data.append('top_k', String(k));
  if (category.value) data.append('category', category.value);
  run(`like image ${file.name}${categoryText()}`, () => api('/search/image', { method: 'POST', body: data }));
}

function similarSearch(recordId, designation) {
  const k = checkedTopK();
  if (k === null) return;
  showQueryImage(null);
  const params = new URLSearchParams({ top_k: String(k) });
  if (category.value) params.set('category', category.value);
  run(`like “${designation}”${categoryText()}`, () => api(`/similar/${recordId}?${params}`));
}

// ---------------------------------------------------------------------------------------------- record view

const FIELDS = [
  ['record_id', 'Record'], ['productid', 'Product id'], ['imageid', 'Image id'], ['designation', 'Designation'],
  ['description', 'Description'], ['prdtypecode', 'Product type code'], ['category', 'Category'],
  ['alignment_score', 'Alignment score'], ['dup_group', 'Duplicate group'], ['image_file', 'Image file'],
  ['version', 'Curated version'],
];

function renderRecord(rec) {
  $('record-title').textContent = rec.designation;
  const list = el('dl', { class: 'fields' });
  for (const [key, label] of FIELDS) {
    let value = rec[key];
    if (key === 'alignment_score') value = fmt(value, 4);
    if (key === 'prdtypecode' && value === null) value = 'unlabelled';
    list.append(el('dt', {}, label), el('dd', {}, value === null || value === undefined || value === '' ? '—' : value));
  }
  recordBody.replaceChildren(
    el('a', { href: appUrl(rec.image_url), class: 'full-image', target: '_blank', rel: 'noopener' },
      el('img', { src: appUrl(rec.image_url), alt: rec.designation, width: 500, height: 500, decoding: 'async' })),
    list,
  );
}

async function openRecord(recordId, from) {
  openRecordId = recordId;
  openedFrom = from || null;
  $('record-title').textContent = `Record ${recordId}`;
  recordBody.replaceChildren();
  moreLikeThis.disabled = true;
  setStatus(recordStatus, 'loading', 'Loading the record…');
  if (!dialog.open) dialog.showModal();
  try {
    const rec = await api(`/record/${encodeURIComponent(recordId)}`);
    if (openRecordId !== recordId) return;
    renderRecord(rec);
    setStatus(recordStatus, 'info', '');
    moreLikeThis.disabled = false;
    moreLikeThis.dataset.designation = rec.designation;
  } catch (e) {
    if (openRecordId !== recordId) return;
    setStatus(recordStatus, 'error', e.message);
  }
}

function closeRecord() {
  if (dialog.open) dialog.close();
}

dialog.addEventListener('close', () => {
  openRecordId = null;
  if (location.hash.startsWith('#record=')) history.replaceState(null, '', location.pathname + location.search);
  if (openedFrom && document.body.contains(openedFrom)) openedFrom.focus();
  openedFrom = null;
});
dialog.addEventListener('click', (e) => { // a click on the backdrop (outside the dialog box) closes it
  const r = dialog.getBoundingClientRect();
  if (e.target === dialog && (e.clientX < r.left || e.clientX > r.right || e.clientY < r.top || e.clientY > r.bottom)) {
    closeRecord();
  }
});
$('record-close').addEventListener('click', closeRecord);
moreLikeThis.addEventListener('click', () => {
  const id = openRecordId;
  const designation = moreLikeThis.dataset.designation || `record ${id}`;
  openedFrom = null;
  closeRecord();
  similarSearch(id, designation);
  results.focus();
});

// ---------------------------------------------------------------------------------------------- inputs

form.addEventListener('submit', (e) => {
  e.preventDefault();
  textSearch();
});
category.addEventListener('change', () => {
  if (q.value.trim()) textSearch();
});
fileInput.addEventListener('change', () => {
  const file = fileInput.files && fileInput.files[0];
  if (file) imageSearch(file);
  fileInput.value = '';
});

let dragDepth = 0;
const hasFiles = (e) => e.dataTransfer && Array.from(e.dataTransfer.types || []).includes('Files');
document.addEventListener('dragenter', (e) => {
  if (!hasFiles(e)) return;
  e.preventDefault();
  dragDepth += 1;
  overlay.hidden = false;
});
document.addEventListener('dragover', (e) => {
  if (!hasFiles(e)) return;
  e.preventDefault();
  e.dataTransfer.dropEffect = 'copy';
});
document.addEventListener('dragleave', () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (dragDepth === 0) overlay.hidden = true;
});
document.addEventListener('drop', (e) => {
  if (!hasFiles(e)) return;
  e.preventDefault();
  dragDepth = 0;
  overlay.hidden = true;
  const file = e.dataTransfer.files[0];
  if (file) imageSearch(file);
});

results.tabIndex = -1;

let headerLoaded = false;

async function refreshHeader() {
  const stats = await loadHeader();
  if (stats && !headerLoaded) {
    headerLoaded = true;
    categories = stats.categories || {};
    const entries = Object.entries(categories).sort((a, b) => a[1].localeCompare(b[1], 'fr'));
    for (const [code, name] of entries) category.append(el('option', { value: code }, categoryLabel(code, name)));
    if (stats.unlabelled > 0) category.append(el('option', { value: 'unlabelled' }, `unlabelled (${stats.unlabelled})`));
  }
}

async function init() {
  await refreshHeader();
  const m = /^#record=(\d+)$/.exec(location.hash);
  if (m) openRecord(Number(m[1]), null);
}

init();
