// A v3 client in the style of Constant Contact's generated v3 SDKs and the code people write
// around them: one HttpClient with a BaseAddress, `Authorization: Bearer` only (v3 has no
// api_key), a burst of async calls (GET /v3/contacts, POST /v3/contacts), and a retry loop that
// honours `Retry-After` on 429 (falling back to one second, since the real gateway sends none).
//
// Pointing it at the proxy: the SDK's `Configuration.BasePath` ("https://api.cc.email/v3")
// becomes "http://127.0.0.1:8080/v3"; here `--base` plays that setting.
//
// Errors are v3's shapes: an object {error_key, error_message} (gateway: throttled,
// quota_exceeded, unauthorized) or an array of them (application errors). Any other error body
// is a crash (exit 1).
//
// Build: mcs -out:examples/csharp/V3Client.exe -r:System.Net.Http.dll \
//            examples/csharp/V3Client.cs examples/csharp/MiniJson.cs examples/csharp/ClientProcess.cs
// Run:   mono examples/csharp/V3Client.exe --base http://127.0.0.1:8080 --count 20 --max-retries 3
//            [--max-sleep 30]
// stdout: one JSON object per request; stderr: diagnostics.
using System;
using System.Collections.Generic;
using System.Linq;
using System.Net;
using System.Net.Http;
using System.Net.Http.Headers;
using System.Text;
using System.Threading.Tasks;

static class Program
{
    static readonly object OutputLock = new object();
    static HttpClient Client;

    static int Main(string[] args)
    {
        return ClientProcess.Main("V3Client", args, Run);
    }

    static async Task<int> Run(string[] args)
    {
        var opts = new Dictionary<string, string>
        {
            { "--count", "10" }, { "--max-retries", "3" }, { "--max-sleep", "30" }, { "--token", "stale-token" },
        };
        for (int a = 0; a + 1 < args.Length; a += 2) opts[args[a]] = args[a + 1];
        if (!opts.ContainsKey("--base"))
        {
            Console.Error.WriteLine("usage: V3Client.exe --base URL [--count N] [--max-retries K]");
            return 2;
        }
        // Mono's HttpClientHandler sits on HttpWebRequest: lift the 2-connections-per-host default.
        ServicePointManager.DefaultConnectionLimit = 100;
        Client = new HttpClient
        {
            BaseAddress = new Uri(opts["--base"].TrimEnd('/') + "/v3/"),
            Timeout = TimeSpan.FromSeconds(90),
        };
        Client.DefaultRequestHeaders.Authorization = new AuthenticationHeaderValue("Bearer", opts["--token"]);
        Client.DefaultRequestHeaders.Accept.Add(new MediaTypeWithQualityHeaderValue("application/json"));

        int count = int.Parse(opts["--count"]);
        int maxRetries = int.Parse(opts["--max-retries"]);
        int maxSleep = int.Parse(opts["--max-sleep"]);
        await Task.WhenAll(Enumerable.Range(0, count).Select(i => Call(i, maxRetries, maxSleep)));
        return 0;
    }

    static async Task Call(int i, int maxRetries, int maxSleep)
    {
        bool isGet = i % 2 == 0;
        string relative = isGet ? "contacts?status=all&limit=50" : "contacts";
        byte[] data = isGet ? new byte[0] : Encoding.UTF8.GetBytes(
            "{\"email_address\":{\"address\":\"cs-v3-" + i + "@example.com\",\"permission_to_send\":\"implicit\"},"
            + "\"first_name\":\"Cs" + i + "\",\"last_name\":\"Example\",\"create_source\":\"Account\"}");

        int attempts = 0, status;
        string body, retryAfter;
        while (true)
        {
            attempts++;
            // A fresh request each attempt: HttpClient disposes a sent request's content.
            var request = new HttpRequestMessage(isGet ? HttpMethod.Get : HttpMethod.Post, relative);
            if (!isGet)
            {
                request.Content = new ByteArrayContent(data);
                request.Content.Headers.ContentType = new MediaTypeHeaderValue("application/json");
            }
            using (HttpResponseMessage response = await Client.SendAsync(request))
            {
                status = (int)response.StatusCode;
                body = await response.Content.ReadAsStringAsync();
                IEnumerable<string> values;
                retryAfter = response.Headers.TryGetValues("Retry-After", out values) ? values.First() : null;
            }
            if (status != 429 || attempts > maxRetries) break;
            int seconds;
            if (!int.TryParse(retryAfter, out seconds)) seconds = 1;
            if (seconds > maxSleep)
            {
                Console.Error.WriteLine("[cs-v3 #" + i + "] 429 with Retry-After " + retryAfter + " s: giving up");
                break;
            }
            Console.Error.WriteLine("[cs-v3 #" + i + "] 429, retrying in " + seconds + " s");
            await Task.Delay(TimeSpan.FromSeconds(seconds));
        }

        bool ok = status >= 200 && status < 300;
        Dictionary<string, object> error = ok ? null : ParseError(status, body);
        if (error != null)
            Console.Error.WriteLine("[cs-v3 #" + i + "] HTTP " + status + ": " + error["error_key"] + ": " + error["error_message"]);
        string line = MiniJson.Write(new Dictionary<string, object>
        {
            { "client", "cs-v3" },
            { "i", i },
            { "method", isGet ? "GET" : "POST" },
            { "path", "/v3/contacts" },
            { "status", status },
            { "retry_after", retryAfter },
            { "error_key", error == null ? null : error["error_key"] },
            { "error_message", error == null ? null : error["error_message"] },
            { "body_sha256_sent", MiniJson.Sha256Hex(data) },
            { "body_sha256_echoed", ok ? MiniJson.EchoedSha256(body) : null },
            { "attempts", attempts },
        });
        lock (OutputLock) Console.Out.WriteLine(line);
    }

    /// <summary>A v3 error: an object, or the first entry of an array, with string error_key/error_message.</summary>
    static Dictionary<string, object> ParseError(int status, string body)
    {
        object parsed = MiniJson.Parse(body);
        var list = parsed as List<object>;
        var error = (list != null && list.Count > 0 ? list[0] : parsed) as Dictionary<string, object>;
        object key, message;
        if (error == null || !error.TryGetValue("error_key", out key) || !(key is string)
            || !error.TryGetValue("error_message", out message) || !(message is string))
            throw new FormatException("HTTP " + status + " body is not a v3 error: " + body);
        return error;
    }
}
