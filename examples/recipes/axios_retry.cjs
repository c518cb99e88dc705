// axios + axios-retry through ctct-proxy: 429 retried after Retry-After, POST included.
//
// axios-retry's default condition (isNetworkOrIdempotentRequestError) retries a 429 only for
// GET, HEAD, OPTIONS, PUT and DELETE; a 429 from the proxy means nothing was sent, so POST is
// safe to retry too. Its delay waits Retry-After as given, hours included: a daily-quota 429
// is handed back here instead. axios follows redirects (up to 21) and has no timeout by default.
//
// Usage: node axios_retry.cjs BASE_URL [COUNT]   (needs: npm install axios axios-retry)

const axios = require('axios');
const { default: axiosRetry, isNetworkOrIdempotentRequestError, retryAfter } = require('axios-retry');

const LONGEST_WAIT_MS = 60_000; // a longer Retry-After is the daily quota: give the 429 back

const [base, count = '10'] = process.argv.slice(2);
const client = axios.create({
  baseURL: `${base.replace(/\/$/, '')}/v3`,
  headers: { Authorization: 'Bearer dummy' }, // the proxy puts in the real token
});
axiosRetry(client, {
  retries: 10,
  retryCondition: (error) =>
    error.response?.status === 429
      ? retryAfter(error) <= LONGEST_WAIT_MS // any method: the proxy sent nothing
      : isNetworkOrIdempotentRequestError(error),
  // The default delay already waits Retry-After; without one, a second.
  retryDelay: (_count, error) => retryAfter(error) || 1000,
});

async function call(i) {
  const method = i % 2 ? 'post' : 'get';
  let response;
  try {
    response =
      method === 'post'
        ? await client.post('/contacts', { email_address: { address: `axios-${i}@example.com` }, create_source: 'Account' })
        : await client.get('/contacts', { params: { limit: 1 } });
  } catch (error) {
    if (!error.response) throw error;
    response = error.response; // a non-2xx answer once the retries are spent (or not retried)
  }
  const retries = response.config['axios-retry']?.retryCount ?? 0;
  return { client: 'axios', i, method: method.toUpperCase(), status: response.status, attempts: retries + 1 };
}

Promise.all([...Array(Number(count)).keys()].map(call)).then((lines) => {
  for (const line of lines) console.log(JSON.stringify(line));
});
