// The search page opened while no corpus is served (/stats 503), then the service becomes ready.
import { install, tick } from './dom_shim.mjs';
let ready = false;
const ids = { 'search-form': 'form', q: 'input', category: 'select', 'top-k': 'input', 'image-file': 'input',
  status: 'p', results: 'ol', 'query-image': 'div', 'drop-overlay': 'div', 'record-view': 'dialog',
  'record-body': 'div', 'record-status': 'p', 'more-like-this': 'button', 'record-title': 'h2', 'record-close': 'button',
  'search-button': 'button', served: 'p', banner: 'div' };
const stats = { version: 'v2', model: 'm', num_records: 10, categories: { 2583: 'Piscine' }, unlabelled: 0, meaningless: false };
const hit = { record_id: 1, score: 0.5, image_url: '/images/1.jpg', designation: 'lampe', prdtypecode: 2583, category: 'Piscine', alignment_score: 0.3 };
const { byId } = install({ ids, routes: (path) => {
  if (!ready) return [503, { detail: 'no curated version loaded yet' }];
  if (path === '/stats') return [200, stats];
  if (path === '/search') return [200, [hit]];
  return [404, { detail: 'nope' }];
} });
byId['top-k'].value = '12';
await import('../../api/static/search.js');
await tick(); await tick();
ready = true;                       // the corpus is loaded a few seconds later
byId.q.value = 'lampe';
byId['search-form'].dispatch('submit');
await tick(); await tick(); await tick();
console.log('status     :', JSON.stringify(byId.status.textContent));
console.log('banner     :', JSON.stringify(byId.banner.textContent), 'hidden =', byId.banner.hidden, 'class =', byId.banner.className);
console.log('served     :', JSON.stringify(byId.served.textContent));
console.log('categories :', byId.category.options.map((o) => o.textContent || '(All)'));
