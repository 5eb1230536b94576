// misalignedCard cuts a long description at 400 UTF-16 code units: an emoji across the cut is split in half.
import { install, tick } from './dom_shim.mjs';
const ids = { reason: 'select', category: 'select', status: 'p', removals: 'div', summary: 'p', pager: 'nav',
  prev: 'button', next: 'button', 'page-info': 'span', filters: 'form', served: 'p', banner: 'div' };
const description = 'a'.repeat(399) + '😀 fin de la description';
const item = { record_id: 7, reason: 'misaligned', designation: 'x', description, alignment_score: 0.1, threshold: 0.15, prdtypecode: null, category: null, image_url: null };
const { byId } = install({ ids, routes: (path) => path === '/stats' ? [503, { detail: 'x' }]
  : [200, { version: 'v1', total: 1, page: 1, page_size: 10, pages: 1, counts: { misaligned: 1 }, categories: {}, items: [item] }] });
await import('../../api/static/curation.js');
await tick(); await tick(); await tick();
const p = byId.removals.find((e) => e.attrs !== undefined && e.className === 'description')[0];
const shown = p.textContent;
console.log('last chars:', [...shown.slice(-3)].map((c) => 'U+' + c.codePointAt(0).toString(16).toUpperCase()).join(' '));
console.log('well-formed UTF-16:', shown.isWellFormed());
