// Page 1 loads (3 pages), then the next page answers 503 (version being swapped / queue full).
import { install, tick } from './dom_shim.mjs';
const ids = { reason: 'select', category: 'select', status: 'p', removals: 'div', summary: 'p', pager: 'nav',
  prev: 'button', next: 'button', 'page-info': 'span', filters: 'form', served: 'p', banner: 'div' };
const item = { record_id: 7, reason: 'misaligned', designation: 'x', description: 'd', alignment_score: 0.1, threshold: 0.15, prdtypecode: null, category: null, image_url: null };
let fail = false;
const { byId, calls } = install({ ids, routes: (path) => path === '/stats' ? [200, { version: 'v1', model: 'm', num_records: 1, categories: {} }]
  : fail ? [503, { detail: 'no curated version loaded yet' }]
  : [200, { version: 'v1', total: 25, page: 1, page_size: 10, pages: 3, counts: { misaligned: 25 }, categories: {}, items: [item] }] });
await import('../../api/static/curation.js');
await tick(); await tick(); await tick();
fail = true;
byId.next.dispatch('click'); await tick(); await tick(); await tick();
console.log('status   :', JSON.stringify(byId.status.textContent));
console.log('items    :', byId.removals.children.length);
console.log('summary  :', JSON.stringify(byId.summary.textContent));
console.log('page-info:', JSON.stringify(byId['page-info'].textContent), '| next disabled:', byId.next.disabled, '| url:', calls.filter((c) => c[0] === 'replaceState').at(-1)[1]);
