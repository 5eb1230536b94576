// /curation?category=2583 where 2583 is a served category with no removals (the API answers 200, total 0).
import { install, tick } from './dom_shim.mjs';
const ids = { reason: 'select', category: 'select', status: 'p', removals: 'div', summary: 'p', pager: 'nav',
  prev: 'button', next: 'button', 'page-info': 'span', filters: 'form', served: 'p', banner: 'div' };
const page = (cat) => ({ version: 'v1', total: cat ? 0 : 3, page: 1, page_size: 10, pages: cat ? 0 : 1,
  counts: { duplicate: 2, misaligned: 1 }, categories: { 10: 'Livres', 40: 'Jeux' }, items: [] });
const { byId, calls } = install({ ids, search: '?category=2583', routes: (path) => {
  if (path === '/stats') return [200, { version: 'v1', model: 'm', num_records: 1, categories: {} }];
  return [200, page(new URLSearchParams(path.split('?')[1]).get('category'))];
} });
await import('../../api/static/curation.js');
await tick(); await tick(); await tick();
console.log('request    :', calls.filter((c) => c[0] === 'fetch').map((c) => c[1]).join(' | '));
console.log('status     :', JSON.stringify(byId.status.textContent));
console.log('select     :', JSON.stringify(byId.category.value), '(shown:', JSON.stringify(byId.category.options[byId.category.selectedIndex]?.textContent ?? '(nothing selected)') + ')');
byId.reason.options.push; byId.reason.value = '';
byId.reason.dispatch('change'); await tick(); await tick();
console.log('after reason change, request:', calls.filter((c) => c[0] === 'fetch').at(-1)[1]);
