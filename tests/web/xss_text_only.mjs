// Hostile product text through the search page: card, record view, status line. Everything must stay text.
import { install, tick } from './dom_shim.mjs';
const ids = { 'search-form': 'form', q: 'input', category: 'select', 'top-k': 'input', 'image-file': 'input',
  status: 'p', results: 'ol', 'query-image': 'div', 'drop-overlay': 'div', 'record-view': 'dialog',
  'record-body': 'div', 'record-status': 'p', 'more-like-this': 'button', 'record-title': 'h2', 'record-close': 'button',
  'search-button': 'button', served: 'p', banner: 'div' };
const evil = '<img src=x onerror=alert(1)>"\'><script>alert(2)</script>';
const hit = { record_id: 1, score: 0.5, image_url: '/images/1.jpg', designation: evil, prdtypecode: null, category: null, alignment_score: 0.3 };
const rec = { ...hit, productid: 1, imageid: 1, description: evil, dup_group: 0, image_file: '1.jpg', version: evil };
const { byId } = install({ ids, routes: (path) => path === '/stats'
  ? [200, { version: evil, model: evil, num_records: 1, categories: { 10: evil }, unlabelled: 1, reload_error: { version: evil, error: evil } }]
  : path === '/search' ? [200, [hit]] : path.startsWith('/record/') ? [200, rec] : [404, { detail: evil }] });
byId['top-k'].value = '3';
await import('../../api/static/search.js'); await tick(); await tick();
byId.q.value = evil; byId['search-form'].dispatch('submit'); await tick(); await tick(); await tick();
const button = byId.results.find((e) => e.tagName === 'BUTTON')[0];
button.dispatch('click'); await tick(); await tick(); await tick();
const all = [byId.results, byId['record-body'], byId.served, byId.banner, byId.category, byId.status];
const writes = all.flatMap((n) => n.find((e) => e.innerHTMLWrites.length > 0));
console.log('innerHTML writes:', writes.length, '| element tags created:', [...new Set(all.flatMap((n) => n.find(() => true).map((e) => e.tagName)))].join(','));
console.log('card alt attr   :', JSON.stringify(button.find((e) => e.tagName === 'IMG')[0].attrs.alt));
console.log('record dd text  :', JSON.stringify(byId['record-body'].find((e) => e.tagName === 'DD')[3].textContent));
