// Node's fetch through ctct-proxy: 429 retried after Retry-After.
//
// fetch retries nothing; it follows redirects (redirect: 'follow', the proxy rewrites a
// Location pointing at the API back to itself); its headers timeout (5 minutes) is above the
// proxy's --max-wait. Node 20's fetch ignores HTTP(S)_PROXY.
//
// Usage: node fetch_retry.mjs BASE_URL [COUNT]   (prints one JSON line per call)

const LONGEST_WAIT = 60; // seconds; a longer Retry-After is the daily quota: give the 429 back
const ATTEMPTS = 10;

const sleep = (seconds) => new Promise((resolve) => setTimeout(resolve, seconds * 1000));

async function call(base, i) {
  const method = i % 2 ? 'POST' : 'GET';
  const body = JSON.stringify({ email_address: { address: `fetch-${i}@example.com` }, create_source: 'Account' });
  let response;
  let attempt = 1;
  for (; ; attempt++) {
    response = await fetch(method === 'POST' ? `${base}/v3/contacts` : `${base}/v3/contacts?limit=1`, {
      method,
      headers: { Authorization: 'Bearer dummy', 'Content-Type': 'application/json' }, // the proxy puts in the real token
      body: method === 'POST' ? body : undefined,
    });
    await response.arrayBuffer(); // read it, so the connection goes back to the pool
    const wait = Number(response.headers.get('retry-after') ?? 1) || 1;
    if (response.status !== 429 || wait > LONGEST_WAIT || attempt === ATTEMPTS) break;
    await sleep(wait);
  }
  return { client: 'fetch', i, method, status: response.status, attempts: attempt };
}

const [base, count = '10'] = process.argv.slice(2);
const lines = await Promise.all([...Array(Number(count)).keys()].map((i) => call(base.replace(/\/$/, ''), i)));
for (const line of lines) console.log(JSON.stringify(line));
