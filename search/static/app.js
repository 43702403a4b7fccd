// clipfleet search UI: clip front's features over the same API (/knn-service, /metadata), plus
// an export of the current results as a parquet file img2dataset downloads as it is (/export).
'use strict';

const NUM_IMAGES = 40;        // results fetched with metadata at once (clip front's number)
const NUM_RESULT_IDS = 3000;  // results fetched in all; the rest get metadata on scroll
const PAGE = 40;

const $ = (id) => document.getElementById(id);
const state = {
  results: [],       // [{id, similarity, url?, caption?, ...}]
  withMetadata: 0,   // how many leading results have metadata
  loadingMore: false,
  last: null,        // {kind: 'text'|'image'|'imageUrl', value}
  image: null,       // base64 of an uploaded image
};

function setStatus(text, isError = false) {
  const status = $('status');
  status.textContent = text;
  status.className = isError ? 'error' : '';
}

async function postJson(path, body) {
  const response = await fetch(path, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(body),
  });
  if (!response.ok) {
    let message = response.status + ' ' + response.statusText;
    try { message = (await response.json()).error || message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

function options() {
  const score = $('aesthetic-score').value;
  return {
    modality: $('modality').value,
    indice_name: $('index').value || null,
    use_mclip: false,
    deduplicate: $('hide-duplicate-images').checked,
    use_safety_model: $('safe-mode').checked,
    use_violence_detector: $('remove-violence').checked,
    aesthetic_score: score,
    aesthetic_weight: $('aesthetic-weight').value,
  };
}

function writeUrl() {
  const params = new URLSearchParams();
  if (state.last && state.last.kind === 'text') params.set('query', state.last.value);
  if (state.last && state.last.kind === 'imageUrl') params.set('imageUrl', state.last.value);
  if (state.last && state.last.kind === 'similar') params.set('similar', String(state.last.value));
  if ($('index').value) params.set('index', $('index').value);
  params.set('modality', $('modality').value);
  params.set('safeMode', $('safe-mode').checked);
  params.set('dedup', $('hide-duplicate-images').checked);
  if ($('aesthetic-score').value !== '') {
    params.set('aestheticScore', $('aesthetic-score').value);
    params.set('aestheticWeight', $('aesthetic-weight').value);
  }
  const url = '?' + params.toString();
  if (url !== window.location.search) window.history.pushState({}, '', url);
}

function readUrl() {
  const params = new URLSearchParams(window.location.search);
  if (params.has('modality')) $('modality').value = params.get('modality');
  if (params.has('safeMode')) $('safe-mode').checked = params.get('safeMode') === 'true';
  if (params.has('dedup')) $('hide-duplicate-images').checked = params.get('dedup') === 'true';
  if (params.has('aestheticScore')) $('aesthetic-score').value = params.get('aestheticScore');
  if (params.has('aestheticWeight')) $('aesthetic-weight').value = params.get('aestheticWeight');
  if (params.has('index')) $('index').value = params.get('index');
  if (params.get('query')) return { kind: 'text', value: params.get('query') };
  if (params.get('imageUrl')) return { kind: 'imageUrl', value: params.get('imageUrl') };
  if (params.get('similar')) return { kind: 'similar', value: Number(params.get('similar')) };
  return null;
}

let searches = 0;  // a search answered after a newer one started is dropped, not drawn over it

async function search(query) {
  const mine = ++searches;
  state.last = query;
  const body = { text: null, image: null, image_url: null, embedding_input: null,
                 num_images: NUM_IMAGES, num_result_ids: NUM_RESULT_IDS, ...options() };
  if (query.kind === 'text') body.text = query.value;
  if (query.kind === 'image') body.image = query.value;
  if (query.kind === 'imageUrl') body.image_url = query.value;
  if (query.kind === 'similar') body.similar_to = query.value;
  $('query').value = query.kind === 'text' ? query.value : '';
  $('image-url').value = query.kind === 'imageUrl' ? query.value : '';
  showQueryImage(query);
  if (query.kind !== 'image') writeUrl();
  setStatus('searching…');
  try {
    const response = await postJson('knn-service', body);
    const results = await response.json();
    if (mine !== searches) return;
    state.results = results;
    state.withMetadata = Math.min(NUM_IMAGES, state.results.length);
    const notes = response.headers.get('X-Clipfleet-Not-Honoured');
    $('notes').textContent = notes ? 'Not applied: ' + notes : '';
    setStatus(state.results.length + ' results');
    $('export').disabled = state.results.length === 0;
    render();
    keepFilling();
  } catch (e) {
    if (mine !== searches) return;
    state.results = [];
    render();
    setStatus(e.message, true);
  }
}

function showQueryImage(query) {
  const box = $('query-image');
  box.textContent = '';
  if (query.kind === 'text' || (query.kind === 'similar' && !query.url)) return;
  const img = document.createElement('img');
  img.alt = 'the query image';
  img.src = query.kind === 'image' ? 'data:image/*;base64,' + query.value : (query.url || query.value);
  box.appendChild(img);
}

function visibleResults() {
  let shown = state.results.slice(0, state.withMetadata).filter((r) => r.url !== undefined || r.caption !== undefined);
  if ($('hide-duplicate-urls').checked) {
    const seen = new Set();
    shown = shown.filter((r) => (seen.has(r.url) ? false : (seen.add(r.url), true)));
  }
  return shown;
}

function figure(result) {
  const fig = document.createElement('figure');
  fig.dataset.id = String(result.id);
  const img = document.createElement('img');
  img.loading = 'lazy';
  img.src = result.url;
  img.alt = result.caption || '';
  img.title = 'search for images like this one';
  // By the result's own stored embedding: exact, and nothing to fetch.
  img.addEventListener('click', () => search({ kind: 'similar', value: result.id, url: result.url }));
  fig.appendChild(img);
  if ($('display-similarities').checked) {
    const sim = document.createElement('div');
    sim.className = 'similarity';
    sim.textContent = result.similarity.toFixed(4);
    fig.appendChild(sim);
  }
  if ($('display-captions').checked && result.caption) {
    const cap = document.createElement('figcaption');
    const full = $('display-full-captions').checked;
    cap.textContent = full || result.caption.length <= 50 ? result.caption : result.caption.slice(0, 50) + '…';
    cap.title = 'search for this caption';
    cap.addEventListener('click', () => search({ kind: 'text', value: result.caption }));
    fig.appendChild(cap);
  }
  return fig;
}

function render() {
  const box = $('results');
  box.textContent = '';
  const shown = visibleResults();
  for (const result of shown) box.appendChild(figure(result));
  if (state.results.length && !shown.length) {
    box.textContent = $('safe-mode').checked ? 'Nothing to show in safe mode.' : 'No results.';
  }
}

async function loadMore() {
  if (state.loadingMore || state.withMetadata >= state.results.length) return;
  state.loadingMore = true;
  const mine = searches;
  const page = state.results.slice(state.withMetadata, state.withMetadata + PAGE);
  try {
    const response = await postJson('metadata', { ids: page.map((r) => r.id), indice_name: $('index').value || null });
    const byId = new Map((await response.json()).map((m) => [String(m.id), m.metadata]));
    if (mine === searches) {  // else: metadata for results a newer search has replaced
      for (let i = 0; i < page.length; i++) {
        const meta = byId.get(String(page[i].id));
        if (meta) state.results[state.withMetadata + i] = { ...meta, ...page[i] };
      }
      state.withMetadata += page.length;
      render();
    }
  } catch (e) {
    if (mine === searches) setStatus(e.message, true);
  }
  state.loadingMore = false;
  keepFilling();
}

// The observer fires when the sentinel comes into view; while it stays in view, keep loading.
function keepFilling() {
  requestAnimationFrame(() => {
    if ($('more').getBoundingClientRect().top < window.innerHeight + 600) loadMore();
  });
}

async function exportResults() {
  if (!state.results.length) return;
  setStatus('exporting ' + state.results.length + ' results…');
  try {
    const response = await postJson('export', {
      ids: state.results.map((r) => r.id),
      similarities: state.results.map((r) => r.similarity),
      indice_name: $('index').value || null,
    });
    const blob = await response.blob();
    const link = document.createElement('a');
    link.href = URL.createObjectURL(blob);
    link.download = 'clipfleet-subset.parquet';
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
    setStatus('exported ' + state.results.length + ' results: img2dataset --url_list clipfleet-subset.parquet ' +
              '--input_format parquet --url_col url --caption_col caption');
  } catch (e) {
    setStatus(e.message, true);
  }
}

function readImage(file) {
  const reader = new FileReader();
  reader.onload = () => search({ kind: 'image', value: String(reader.result).split(',')[1] });
  reader.readAsDataURL(file);
}

async function start() {
  const scores = $('aesthetic-score');
  for (let i = 0; i <= 9; i++) {
    const opt = document.createElement('option');
    opt.value = opt.textContent = String(i);
    scores.appendChild(opt);
  }
  // Listeners first: a file picked (or a query typed) while the index list loads is not lost.
  $('search-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const text = $('query').value.trim();
    if (text) search({ kind: 'text', value: text });
  });
  $('url-search').addEventListener('click', () => {
    const url = $('image-url').value.trim();
    if (url) search({ kind: 'imageUrl', value: url });
  });
  $('image-file').addEventListener('change', (e) => { if (e.target.files[0]) readImage(e.target.files[0]); });
  $('export').addEventListener('click', exportResults);
  // Options that change what the service returns search again; display options only redraw.
  for (const id of ['modality', 'index', 'safe-mode', 'remove-violence', 'hide-duplicate-images', 'aesthetic-score',
                    'aesthetic-weight']) {
    $(id).addEventListener('change', () => { if (state.last) search(state.last); });
  }
  for (const id of ['display-captions', 'display-full-captions', 'display-similarities', 'hide-duplicate-urls']) {
    $(id).addEventListener('change', render);
  }
  new IntersectionObserver((entries) => {
    if (entries.some((e) => e.isIntersecting)) loadMore();
  }, { rootMargin: '600px' }).observe($('more'));
  window.addEventListener('popstate', () => { const q = readUrl(); if (q) search(q); });
  try {
    const indices = await (await fetch('indices-list')).json();
    for (const name of indices) {
      const opt = document.createElement('option');
      opt.value = opt.textContent = name;
      $('index').appendChild(opt);
    }
  } catch (e) {
    setStatus('the service does not answer: ' + e.message, true);
  }
  const initial = readUrl();
  if (initial) search(initial);
}

start();
