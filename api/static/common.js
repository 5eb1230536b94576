// Shared by the search page and the curation browser: JSON calls with readable errors, DOM helpers, the header.

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** The app's base path: '/', or '/api/' behind a proxy prefix (uvicorn --root-path /api). The pages are the app's
 * '/' and '/curation', so every call and every /images URL is resolved under the directory they are served from. */
export const BASE = location.pathname.replace(/curation\/?$/, '').replace(/[^/]*$/, '');

/** An app path ('/stats') or a URL the API returned ('/images/…'), under BASE; absolute URLs are left alone. */
export function appUrl(url) {
  if (typeof url !== 'string' || !url.startsWith('/') || url.startsWith('//')) return url;
  return BASE + url.slice(1);
}

function describe(status, body, retryAfter) {
  let detail = body && body.detail;
  if (Array.isArray(detail)) {
    detail = detail.map((d) => `${(d.loc || []).slice(1).join('.') || 'request'}: ${d.msg}`).join('; ');
  } else if (detail && typeof detail !== 'string') {
    detail = JSON.stringify(detail);
  }
  detail = detail || `HTTP ${status}`;
  const prefix = {
    400: 'Bad request', 404: 'Not found', 413: 'Too large', 415: 'Not a usable image', 422: 'Invalid request',
    503: Number(retryAfter) <= 2 ? 'The search service is busy' : 'The search service is not ready',
  }[status] || `Error ${status}`;
  return `${prefix}: ${detail}`;
}

/** fetch + JSON; throws ApiError(status, message) with the server's `detail` for anything but 2xx. */
export async function api(path, options = {}) {
  let resp;
  try {
    resp = await fetch(appUrl(path), { headers: { Accept: 'application/json' }, ...options });
  } catch (e) {
    throw new ApiError(0, `The server could not be reached (${e.message}).`);
  }
  const text = await resp.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = null;
  }
  if (!resp.ok) throw new ApiError(resp.status, describe(resp.status, body, resp.headers.get('Retry-After')));
  return body;
}

/** el('a', {href: '/', class: 'x', dataset: {id: 1}}, 'text', child) — text is always text, never HTML. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === 'class') node.className = value;
    else if (key === 'dataset') Object.assign(node.dataset, value);
    else if (key === 'text') node.textContent = value;
    else node.setAttribute(key, value === true ? '' : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** A status line: kind is info | loading | empty | error. */
export function setStatus(node, kind, message) {
  node.className = `status status-${kind}`;
  node.textContent = message;
  node.hidden = !message;
}

export function fmt(value, digits = 3) {
  return typeof value === 'number' && Number.isFinite(value) ? value.toFixed(digits) : '—';
}

export function categoryLabel(code, name) {
  if (code === null || code === undefined || code === 'unlabelled') return 'unlabelled';
  return name ? `${name} (${code})` : String(code);
}

/** Fill the header from /stats (version, model, rows) and raise the banners; returns the stats or null. */
export async function loadHeader() {
  const served = document.getElementById('served');
  const banner = document.getElementById('banner');
  try {
    const stats = await api('/stats');
    served.replaceChildren(
      el('span', {}, 'version ', el('code', {}, stats.version)),
      el('span', {}, 'model ', el('code', {}, stats.model)),
      el('span', {}, `${stats.num_records.toLocaleString('en')} records`),
    );
    const notes = [];
    if (stats.meaningless) {
      notes.push(`Model ${stats.model}: scores are meaningless (random weights, a smoke-test corpus; not real search).`);
    }
    if (stats.reload_error) {
      notes.push(`A newer version (${stats.reload_error.version || 'CURRENT'}) could not be loaded and this one `
        + `keeps serving: ${stats.reload_error.error}`);
    }
    banner.textContent = notes.join(' ');
    banner.className = 'banner banner-warn';
    banner.hidden = notes.length === 0;
    return stats;
  } catch (e) {
    served.textContent = 'no version served';
    banner.textContent = e.message;
    banner.className = 'banner banner-error';
    banner.hidden = false;
    return null;
  }
}
