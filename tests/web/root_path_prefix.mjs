// The curation page served behind a proxy prefix (uvicorn --root-path /api): every call, image and link stays under it.
import { install, tick } from './dom_shim.mjs';
const ids = { reason: 'select', category: 'select', status: 'p', removals: 'div', summary: 'p', pager: 'nav',
  prev: 'button', next: 'button', 'page-info': 'span', filters: 'form', served: 'p', banner: 'div' };
const item = { record_id: 7, reason: 'duplicate', designation: 'x', image_url: '/images/7_7.jpg', duplicate_of: 8,
  kept_served: true, kept_designation: 'y', kept_image_url: 'https://cdn.example/images/8_8.jpg', similarity: 0.99 };
const { byId, calls } = install({ ids, pathname: '/api/curation', routes: (path) => path === '/api/stats'
  ? [200, { version: 'v1', model: 'm', num_records: 1, categories: {} }]
  : path.startsWith('/api/curation/removals') ? [200, { version: 'v1', total: 1, page: 1, page_size: 10, pages: 1,
    counts: { duplicate: 1 }, categories: {}, items: [item] }] : [404, { detail: 'outside the prefix: ' + path }] });
await import('../../api/static/curation.js');
await tick(); await tick(); await tick();
const imgs = byId.removals.find((e) => e.tagName === 'IMG').map((e) => e.attrs.src);
const links = byId.removals.find((e) => e.tagName === 'A').map((e) => e.attrs.href);
console.log('fetched:', calls.filter((c) => c[0] === 'fetch').map((c) => c[1]).join(' | '));
console.log('images :', imgs.join(' | '));
console.log('links  :', links.join(' | '));
