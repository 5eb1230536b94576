// A minimal DOM + fetch shim, enough to run api/static/*.js under node (no jsdom or browser needed).
export class Node {}
export class Text extends Node {
  constructor(t) { super(); this.data = String(t); this.parentNode = null; }
  get textContent() { return this.data; }
}
export class Element extends Node {
  constructor(tag) {
    super(); this.tagName = tag.toUpperCase(); this.attrs = {}; this.children = []; this.parentNode = null;
    this.dataset = {}; this.className = ''; this.hidden = false; this.disabled = false; this.listeners = {};
    this._selectedIndex = 0; this.open = false; this.tabIndex = 0;
    const self = this;
    this.classList = { toggle(c, on) { const s = new Set(self.className.split(' ').filter(Boolean)); on ? s.add(c) : s.delete(c); self.className = [...s].join(' '); } };
    this.innerHTMLWrites = [];
  }
  set innerHTML(v) { this.innerHTMLWrites.push(v); }
  setAttribute(k, v) { this.attrs[k] = String(v); }
  getAttribute(k) { return k in this.attrs ? this.attrs[k] : null; }
  append(...nodes) { for (const n of nodes) { const c = n instanceof Node ? n : new Text(n); if (c.parentNode) c.parentNode.children = c.parentNode.children.filter((x) => x !== c); c.parentNode = this; this.children.push(c); } }
  replaceChildren(...nodes) { for (const c of this.children) c.parentNode = null; this.children = []; this.append(...nodes); }
  remove() { if (this.parentNode) { this.parentNode.children = this.parentNode.children.filter((x) => x !== this); this.parentNode = null; } }
  get textContent() { return this.children.map((c) => c.textContent).join(''); }
  set textContent(v) { this.replaceChildren(new Text(v)); }
  get text() { return this.textContent; }
  addEventListener(type, fn) { (this.listeners[type] ||= []).push(fn); }
  dispatch(type, ev = {}) { for (const fn of this.listeners[type] || []) fn({ preventDefault() {}, target: this, ...ev }); }
  focus() {} showModal() { this.open = true; } close() { this.open = false; this.dispatch('close'); }
  getBoundingClientRect() { return { left: 0, right: 0, top: 0, bottom: 0 }; }
  // <option>/<select>
  get options() { return this.children.filter((c) => c.tagName === 'OPTION'); }
  get selectedIndex() { return this.options.length ? this._selectedIndex : -1; }
  get value() {
    if (this.tagName === 'OPTION') return this.getAttribute('value') ?? this.textContent;
    if (this.tagName === 'SELECT') { const o = this.options[this._selectedIndex]; return o ? o.value : ''; }
    return this._value ?? '';
  }
  set value(v) {
    if (this.tagName === 'SELECT') { this._selectedIndex = this.options.findIndex((o) => o.value === String(v)); return; }
    this._value = String(v);
  }
  contains() { return true; }
  find(pred, out = []) { if (pred(this)) out.push(this); for (const c of this.children) if (c instanceof Element) c.find(pred, out); return out; }
}
export function install({ ids, search = '', hash = '', pathname = '/curation', routes }) {
  const byId = {};
  for (const [id, tag] of Object.entries(ids)) { byId[id] = new Element(tag); byId[id].id = id; }
  for (const id of Object.keys(ids)) if (ids[id] === 'select') byId[id].append(Object.assign(new Element('option'), {}));
  for (const id of Object.keys(ids)) if (ids[id] === 'select') byId[id].options[0].setAttribute('value', '');
  const body = new Element('body');
  const doc = { getElementById: (id) => byId[id], createElement: (t) => new Element(t), createTextNode: (t) => new Text(t),
    body, addEventListener() {} };
  const calls = [];
  Object.assign(globalThis, {
    Node, document: doc,
    location: { search, hash, pathname },
    history: { replaceState: (_s, _t, url) => { calls.push(['replaceState', url]); } },
    fetch: async (path, opts) => { calls.push(['fetch', path]); const [status, body, headers = {}] = routes(path, opts, calls); return { ok: status >= 200 && status < 300, status, headers: { get: (k) => headers[k] ?? null }, text: async () => JSON.stringify(body) }; },
  });
  return { byId, calls };
}
export const tick = () => new Promise((r) => setTimeout(r, 0));
