// An overloaded server (503, Retry-After: 1) is "busy", not "not ready".
import { install, tick } from './dom_shim.mjs';
const ids = { 'search-form': 'form', q: 'input', category: 'select', 'top-k': 'input', 'image-file': 'input',
  status: 'p', results: 'ol', 'query-image': 'div', 'drop-overlay': 'div', 'record-view': 'dialog',
  'record-body': 'div', 'record-status': 'p', 'more-like-this': 'button', 'record-title': 'h2', 'record-close': 'button',
  'search-button': 'button', served: 'p', banner: 'div' };
const { byId } = install({ ids, pathname: '/', routes: (path) => path === '/stats'
  ? [200, { version: 'v1', model: 'm', num_records: 1, categories: {}, unlabelled: 0 }]
  : [503, { detail: '8 queries are already waiting for the text encoder; retry shortly' }, { 'Retry-After': '1' }] });
byId['top-k'].value = '3';
await import('../../api/static/search.js'); await tick(); await tick();
byId.q.value = 'lampe'; byId['search-form'].dispatch('submit'); await tick(); await tick(); await tick();
console.log('status     :', JSON.stringify(byId.status.textContent));
