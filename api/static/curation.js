// The curation browser: the served version's removals by reason, paged, filterable by reason and category.
import { BASE, api, appUrl, categoryLabel, el, fmt, loadHeader, setStatus } from './common.js';

const $ = (id) => document.getElementById(id);
const reason = $('reason');
const category = $('category');
const statusLine = $('status');
const list = $('removals');
const summary = $('summary');
const pager = $('pager');
const PAGE_SIZE = 10;
const REASON_TITLES = { duplicate: 'Duplicates', misaligned: 'Misaligned image–text pairs' };

let page = 1;
let seq = 0;
let categoriesFilled = false;

function figure(url, alt, caption) {
  const image = url
    ? el('img', { src: appUrl(url), alt, width: 220, height: 220, loading: 'lazy', decoding: 'async' })
    : el('div', { class: 'no-image' }, 'no image');
  return el('figure', {}, image, el('figcaption', {}, ...caption));
}

function recordLink(id, served) {
  return served ? el('a', { href: `${BASE}#record=${id}` }, `#${id}`) : el('span', {}, `#${id}`);
}

function duplicateCard(r) {
  const why = `similarity ${fmt(r.similarity, 4)}${r.evidence ? ` (${r.evidence})` : ''}`;
  return el('article', { class: 'removal removal-duplicate' },
    el('div', { class: 'pair' },
      figure(r.image_url, r.designation || '', [el('strong', {}, 'Removed '), el('span', {}, `#${r.record_id}`),
        el('span', { class: 'designation' }, r.designation || '—')]),
      figure(r.kept_image_url, r.kept_designation || '', [el('strong', {}, 'Kept '),
        r.duplicate_of === null ? '—' : recordLink(r.duplicate_of, r.kept_served),
        el('span', { class: 'designation' }, r.kept_designation || '—')])),
    el('p', { class: 'why' }, el('span', { class: 'badge' }, 'duplicate'), ' ', why, ' · ',
      categoryLabel(r.prdtypecode, r.category)),
  );
}

function misalignedCard(r) {
  const gap = (typeof r.alignment_score === 'number' && typeof r.threshold === 'number')
    ? ` (${(r.alignment_score - r.threshold).toFixed(4)})` : '';
  const chars = Array.from(r.description || '');  // code points: an emoji is never cut in half
  const text = chars.length > 400 ? `${chars.slice(0, 400).join('')}…` : r.description;
  return el('article', { class: 'removal removal-misaligned' },
    el('div', { class: 'single' },
      figure(r.image_url, r.designation || '', [el('span', {}, `#${r.record_id}`)]),
      el('div', { class: 'text' },
        el('h3', {}, r.designation || '—'),
        text ? el('p', { class: 'description' }, text) : null,
        el('p', { class: 'why' }, el('span', { class: 'badge badge-warn' }, 'misaligned'), ' ',
          `alignment score ${fmt(r.alignment_score, 4)} < threshold ${fmt(r.threshold, 4)}${gap}`),
        el('p', { class: 'category' }, categoryLabel(r.prdtypecode, r.category)))),
  );
}

function fillCategories(cats) {
  if (categoriesFilled) return;
  categoriesFilled = true;
  const selected = category.value;
  for (const option of Array.from(category.options)) if (option.value) option.remove();
  const entries = Object.entries(cats).sort((a, b) => a[1].localeCompare(b[1], 'fr'));
  for (const [code, name] of entries) category.append(el('option', { value: code }, categoryLabel(code, name)));
  if (selected && !(selected in cats)) category.append(el('option', { value: selected }, selected));  // from the URL
  category.value = selected;
}

function syncUrl() {
  const params = new URLSearchParams();
  if (reason.value) params.set('reason', reason.value);
  if (category.value) params.set('category', category.value);
  if (page > 1) params.set('page', String(page));
  const qs = params.toString();
  history.replaceState(null, '', qs ? `?${qs}` : location.pathname);
}

async function load() {
  const mine = ++seq;
  const params = new URLSearchParams({ page: String(page), page_size: String(PAGE_SIZE) });
  if (reason.value) params.set('reason', reason.value);
  if (category.value) params.set('category', category.value);
  syncUrl();
  list.setAttribute('aria-busy', 'true');
  setStatus(statusLine, 'loading', 'Loading removals…');
  try {
    const data = await api(`/curation/removals?${params}`);
    if (mine !== seq) return;
    fillCategories(data.categories || {});
    const counts = data.counts || {};
    summary.textContent = Object.keys(counts).length
      ? `Version ${data.version}: ${counts.duplicate || 0} duplicates, ${counts.misaligned || 0} misaligned removed.`
      : '';
    const nodes = [];
    let current = null;
    for (const r of data.items) {
      if (r.reason !== current) {
        current = r.reason;
        nodes.push(el('h2', { class: 'reason-title' }, REASON_TITLES[current] || current));
      }
      nodes.push(r.reason === 'duplicate' ? duplicateCard(r) : misalignedCard(r));
    }
    list.replaceChildren(...nodes);
    if (data.note) setStatus(statusLine, 'info', data.note);
    else if (data.total === 0) setStatus(statusLine, 'empty', 'No removals match these filters.');
    else if (data.items.length === 0) setStatus(statusLine, 'empty', `Page ${page} is past the end.`);
    else setStatus(statusLine, 'info', '');
    $('page-info').textContent = data.pages ? `Page ${data.page} of ${data.pages} · ${data.total} removals` : '';
    $('prev').disabled = page <= 1;
    $('next').disabled = page >= data.pages;
    pager.hidden = data.pages <= 1 && page === 1;
  } catch (e) {
    if (mine !== seq) return;
    list.replaceChildren();
    summary.textContent = '';  // nothing of the page that did not load stays on screen as if it had
    $('page-info').textContent = '';
    $('next').disabled = true;
    $('prev').disabled = page <= 1;
    setStatus(statusLine, 'error', e.message);
  } finally {
    if (mine === seq) list.setAttribute('aria-busy', 'false');
  }
}

reason.addEventListener('change', () => { page = 1; load(); });
category.addEventListener('change', () => { page = 1; load(); });
$('filters').addEventListener('submit', (e) => { e.preventDefault(); page = 1; load(); });
$('prev').addEventListener('click', () => { if (page > 1) { page -= 1; load(); } });
$('next').addEventListener('click', () => { page += 1; load(); });

function fromUrl() {
  const params = new URLSearchParams(location.search);
  if (['duplicate', 'misaligned'].includes(params.get('reason'))) reason.value = params.get('reason');
  const cat = params.get('category');
  if (cat && /^(\d{1,9}|unlabelled)$/.test(cat)) category.append(el('option', { value: cat }, cat));
  if (cat) category.value = cat;
  const p = Number.parseInt(params.get('page') || '1', 10);
  page = Number.isInteger(p) && p > 0 ? p : 1;
}

fromUrl();
loadHeader();
load();
