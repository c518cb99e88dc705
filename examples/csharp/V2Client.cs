// A v2 client in the style of Constant Contact's v2 .NET SDK (namespace CTCT: RestClient,
// CUrlResponse, CUrlRequestError, CtctException): HttpWebRequest, both
// credentials on every call (`api_key` query parameter and `Authorization: Bearer`), a burst of
// calls fired at once as async tasks (Task.WhenAll over GetResponseAsync): the pattern the
// forum's C# users hit mashery.not.authorized.over.qps with.
//
// Pointing it at the proxy: newer SDK builds read the application setting BaseUrl of
// CTCT.Settings.Endpoints, which app.config/web.config can override (<applicationSettings>,
// see docs/clients.md) with "http://127.0.0.1:8080/v2/". The base must end in "/v2/" because
// the SDK builds paging URLs as BaseUrl + next.Replace("/v2/", ""). Here `--base` plays that
// setting.
//
// Like the SDK, it appends its api_key to a URL that may already carry one, so the proxy sees
// `?api_key=stale&api_key=stale2` and must replace both. Errors become a CtctException whose
// message is `error_key:error_message` lines parsed from a JSON ARRAY body; the SDK drops the
// response headers, so its callers only learn a wait from error_message. A non-array error
// body is a crash (exit 1), as it is for the SDK.
//
// Build: mcs -out:examples/csharp/V2Client.exe examples/csharp/V2Client.cs examples/csharp/MiniJson.cs examples/csharp/ClientProcess.cs
// Run:   mono examples/csharp/V2Client.exe --base http://127.0.0.1:8080 --count 20 [--max-retries 0]
// stdout: one JSON object per request; stderr: diagnostics.
using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using System.Net;
using System.Text;
using System.Threading.Tasks;

class CUrlRequestError
{
    public string ErrorKey;
    public string ErrorMessage;
}

class CUrlResponse
{
    public int StatusCode;
    public string Body;
    public string RetryAfter;  // kept for the test harness; the SDK itself throws headers away
    public List<CUrlRequestError> Info = new List<CUrlRequestError>();
    public bool IsError { get { return StatusCode < 200 || StatusCode >= 300; } }

    public string GetErrorMessage()
    {
        return string.Join(Environment.NewLine, Info.Select(e => e.ErrorKey + ":" + e.ErrorMessage));
    }
}

class CtctException : Exception
{
    public CtctException(string message) : base(message) { }
}

static class RestClient
{
    public static string BaseUrl = "https://api.constantcontact.com/v2/";
    public static string ApiKey = "stale2";
    public static string AccessToken = "stale-token";

    /// <summary>The SDK's habit: append its key whether or not the URL already has one.</summary>
    static string AddApiKey(string url)
    {
        return url + (url.Contains("?") ? "&" : "?") + "api_key=" + Uri.EscapeDataString(ApiKey);
    }

    public static async Task<CUrlResponse> HttpRequestAsync(string method, string url, byte[] data)
    {
        var request = (HttpWebRequest)WebRequest.Create(AddApiKey(url));
        request.Method = method;
        request.Accept = "application/json";
        request.ContentType = "application/json";
        request.Headers["Authorization"] = "Bearer " + AccessToken;
        request.Headers["x-ctct-request-source"] = "sdk.NET.2.x";
        if (data != null)
        {
            request.ContentLength = data.Length;
            using (Stream stream = await request.GetRequestStreamAsync())
                await stream.WriteAsync(data, 0, data.Length);
        }
        try
        {
            using (var response = (HttpWebResponse)await request.GetResponseAsync())
                return Read(response);
        }
        catch (WebException e) when (e.Response is HttpWebResponse)
        {
            using (var response = (HttpWebResponse)e.Response)
            {
                CUrlResponse result = Read(response);
                result.Info = ParseErrors(result.StatusCode, result.Body);
                return result;
            }
        }
    }

    static CUrlResponse Read(HttpWebResponse response)
    {
        using (var reader = new StreamReader(response.GetResponseStream(), Encoding.UTF8))
            return new CUrlResponse
            {
                StatusCode = (int)response.StatusCode,
                Body = reader.ReadToEnd(),
                RetryAfter = response.Headers["Retry-After"],
            };
    }

    /// <summary>v2 errors are a JSON array of {error_key, error_message}; anything else is fatal.</summary>
    static List<CUrlRequestError> ParseErrors(int status, string body)
    {
        var list = MiniJson.Parse(body) as List<object>;
        if (list == null || list.Count == 0)
            throw new FormatException("HTTP " + status + " body is not a v2 error array: " + body);
        return list.Select(item =>
        {
            var error = item as Dictionary<string, object>;
            object key, message;
            if (error == null || !error.TryGetValue("error_key", out key) || !(key is string)
                || !error.TryGetValue("error_message", out message) || !(message is string))
                throw new FormatException("HTTP " + status + " error entry lacks error_key/error_message: " + body);
            return new CUrlRequestError { ErrorKey = (string)key, ErrorMessage = (string)message };
        }).ToList();
    }
}

static class Program
{
    static readonly object OutputLock = new object();

    static int Main(string[] args)
    {
        return ClientProcess.Main("V2Client", args, Run);
    }

    static async Task<int> Run(string[] args)
    {
        var opts = new Dictionary<string, string> { { "--count", "10" }, { "--max-retries", "0" } };
        for (int a = 0; a + 1 < args.Length; a += 2) opts[args[a]] = args[a + 1];
        if (!opts.ContainsKey("--base"))
        {
            Console.Error.WriteLine("usage: V2Client.exe --base URL [--count N] [--max-retries K]");
            return 2;
        }
        RestClient.BaseUrl = opts["--base"].TrimEnd('/') + "/v2/";
        int count = int.Parse(opts["--count"]);
        int maxRetries = int.Parse(opts["--max-retries"]);
        // .NET's default of 2 connections per host would serialise the burst; real apps raise it.
        ServicePointManager.DefaultConnectionLimit = 100;

        await Task.WhenAll(Enumerable.Range(0, count).Select(i => Call(i, maxRetries)));
        return 0;
    }

    static async Task Call(int i, int maxRetries)
    {
        bool isGet = i % 2 == 0;
        string path = isGet ? "lists" : "contacts";
        // A URL that already carries a (stale) key, as the SDK's callers and paging links do.
        string url = RestClient.BaseUrl + (isGet ? "lists?api_key=stale"
                                                 : "contacts?action_by=ACTION_BY_OWNER&api_key=stale");
        byte[] data = isGet ? null : Encoding.UTF8.GetBytes(
            "{\"lists\":[{\"id\":\"1\"}],\"email_addresses\":[{\"email_address\":\"cs-v2-" + i
            + "@example.com\"}],\"first_name\":\"Cs" + i + "\",\"last_name\":\"Example\"}");

        CUrlResponse response;
        int attempts = 0;
        while (true)
        {
            attempts++;
            response = await RestClient.HttpRequestAsync(isGet ? "GET" : "POST", url, data);
            if (!response.IsError) break;
            var error = new CtctException(response.GetErrorMessage());
            Console.Error.WriteLine("[cs-v2 #" + i + "] HTTP " + response.StatusCode + ": " + error.Message);
            // The forum's workaround: catch the exception, wait a second, try again.
            if (!error.Message.StartsWith("mashery.not.authorized.over.qps:") || attempts > maxRetries) break;
            await Task.Delay(1000);
        }

        CUrlRequestError first = response.Info.FirstOrDefault();
        string line = MiniJson.Write(new Dictionary<string, object>
        {
            { "client", "cs-v2" },
            { "i", i },
            { "method", isGet ? "GET" : "POST" },
            { "path", "/v2/" + path },
            { "status", response.StatusCode },
            { "retry_after", response.RetryAfter },
            { "error_key", first == null ? null : first.ErrorKey },
            { "error_message", first == null ? null : first.ErrorMessage },
            { "body_sha256_sent", MiniJson.Sha256Hex(data ?? new byte[0]) },
            { "body_sha256_echoed", response.IsError ? null : MiniJson.EchoedSha256(response.Body) },
            { "attempts", attempts },
        });
        lock (OutputLock) Console.Out.WriteLine(line);
    }
}
