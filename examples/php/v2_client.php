<?php
/**
 * A v2 PHP client in the style of Constant Contact's v2 PHP SDK (constantcontact/php-sdk: the
 * curl `Ctct\Util\RestClient` of 1.x, whose request/exception flow 2.x keeps on top of Guzzle):
 * both credentials on every call (`api_key` in the query string and `Authorization: Bearer`),
 * contacts added one at a time, then one multipart bulk import
 * (`POST /v2/activities/addcontacts`), the forum's advice for volume. Needs PHP >= 8.1 + curl.
 *
 * Pointing it at the proxy: the SDK keeps its base URL in a private static config
 * (`Config.php`, 'endpoints.base_url' => 'https://api.constantcontact.com/v2/'); users patch that
 * one line. Here `--base` plays the patch: Config::$props['base_url'] = "$base/v2/".
 * The credentials it sends are deliberately stale: the proxy must replace them.
 *
 * Errors are handled as the SDK does: a 4xx/5xx body goes through json_decode($body, true) and
 * must be a LIST of {error_key, error_message}; anything else (an object, XML, HTML) is what
 * makes the SDK die with a type error, so this program exits non-zero on it.
 *
 * Usage: php v2_client.php --base http://127.0.0.1:8080 --count 10 --id job1
 *            [--api-key stale-key] [--token stale-token] [--rows 300] [--max-retries 0]
 * stdout: one JSON object per request; stderr: diagnostics.
 */

declare(strict_types=1);

const JSON_OUTPUT_FLAGS = JSON_UNESCAPED_SLASHES | JSON_INVALID_UTF8_SUBSTITUTE | JSON_THROW_ON_ERROR;

final class Config
{
    /** The one line users patch in the SDK's Config.php. */
    public static array $props = ['base_url' => 'https://api.constantcontact.com/v2/'];
}

final class CtctException extends Exception
{
    public function __construct(
        string $body,
        public readonly int $status,
        public readonly array $errors,
        public readonly ?string $retryAfter,
    ) {
        parent::__construct($body);
    }
}

final class RestClient
{
    /**
     * Send one request; return [status, headers (lower-case names), body]. Throws CtctException
     * on status >= 400 with the decoded error list, and RuntimeException when that body is not
     * the list the SDK expects.
     */
    public static function send(string $method, string $url, array $headers, ?string $body): array
    {
        $responseHeaders = [];
        $curl = curl_init();
        curl_setopt_array($curl, [
            CURLOPT_URL => $url,
            CURLOPT_CUSTOMREQUEST => $method,
            CURLOPT_RETURNTRANSFER => true,
            CURLOPT_HTTPHEADER => $headers,
            CURLOPT_CONNECTTIMEOUT => 10,
            CURLOPT_TIMEOUT => 90,
            CURLOPT_HEADERFUNCTION => function ($curl, string $line) use (&$responseHeaders): int {
                $parts = explode(':', $line, 2);
                if (count($parts) === 2) {
                    $responseHeaders[strtolower(trim($parts[0]))] = trim($parts[1]);
                }
                return strlen($line);
            },
        ]);
        if ($body !== null) {
            curl_setopt($curl, CURLOPT_POSTFIELDS, $body);
        }
        $responseBody = curl_exec($curl);
        if ($responseBody === false) {
            $error = curl_error($curl);
            curl_close($curl);
            throw new RuntimeException("curl: $error ($method $url)");
        }
        $status = (int) curl_getinfo($curl, CURLINFO_RESPONSE_CODE);
        curl_close($curl);

        if ($status < 200 || $status >= 300) {
            $errors = json_decode($responseBody, true);
            if (!self::isErrorList($errors)) {
                throw new RuntimeException(
                    "HTTP $status body is not a v2 error array: " . substr($responseBody, 0, 300)
                );
            }
            throw new CtctException($responseBody, $status, $errors, $responseHeaders['retry-after'] ?? null);
        }
        return [$status, $responseHeaders, $responseBody];
    }

    private static function isErrorList(mixed $decoded): bool
    {
        if (!is_array($decoded) || !array_is_list($decoded) || $decoded === []) {
            return false;
        }
        foreach ($decoded as $error) {
            if (!is_array($error) || !is_string($error['error_key'] ?? null)
                || !is_string($error['error_message'] ?? null)) {
                return false;
            }
        }
        return true;
    }
}

function parse_args(array $argv): array
{
    $opts = [
        'base' => null, 'count' => '5', 'id' => 'php', 'api-key' => 'stale-key',
        'token' => 'stale-token', 'rows' => '300', 'max-retries' => '0',
    ];
    for ($i = 1; $i < count($argv); $i += 2) {
        $name = substr($argv[$i], 2);
        if (!str_starts_with($argv[$i], '--') || !array_key_exists($name, $opts) || !isset($argv[$i + 1])) {
            fwrite(STDERR, "usage: php v2_client.php --base URL [--count N] [--id NAME] ...\n");
            exit(2);
        }
        $opts[$name] = $argv[$i + 1];
    }
    if ($opts['base'] === null) {
        fwrite(STDERR, "--base is required\n");
        exit(2);
    }
    return $opts;
}

/** A multipart body built by hand (fixed boundary) so the exact bytes sent are known. */
function multipart_body(string $boundary, array $fields, string $fileField, string $fileName, string $data): string
{
    $body = '';
    foreach ($fields as $name => $value) {
        $body .= "--$boundary\r\nContent-Disposition: form-data; name=\"$name\"\r\n\r\n$value\r\n";
    }
    $body .= "--$boundary\r\nContent-Disposition: form-data; name=\"$fileField\"; filename=\"$fileName\"\r\n"
        . "Content-Type: text/csv\r\n\r\n$data\r\n--$boundary--\r\n";
    return $body;
}

/** Send with the retry habit of the forum's scripts: on over-qps, sleep a second and try again. */
function call(array $opts, int $i, string $method, string $path, string $contentType, string $body): array
{
    $url = Config::$props['base_url'] . $path . (str_contains($path, '?') ? '&' : '?')
        . 'api_key=' . rawurlencode($opts['api-key']);
    $headers = [
        'Authorization: Bearer ' . $opts['token'],
        'Content-Type: ' . $contentType,
        'Accept: application/json',
        'x-ctct-request-source: sdk.php.2.x',
    ];
    $line = [
        'client' => 'php-v2', 'id' => $opts['id'], 'i' => $i, 'method' => $method,
        'path' => '/v2/' . explode('?', $path)[0], 'status' => null, 'retry_after' => null,
        'error_key' => null, 'error_message' => null, 'body_sha256_sent' => hash('sha256', $body),
        'body_sha256_echoed' => null, 'attempts' => 0,
    ];
    while (true) {
        $line['attempts']++;
        try {
            [$status, , $responseBody] = RestClient::send($method, $url, $headers, $body);
            $echo = json_decode($responseBody, true);
            $line = array_merge($line, [
                'status' => $status, 'retry_after' => null, 'error_key' => null, 'error_message' => null,
                'body_sha256_echoed' => is_array($echo) ? ($echo['body_sha256'] ?? null) : null,
            ]);
            return $line;
        } catch (CtctException $e) {
            $line = array_merge($line, [
                'status' => $e->status, 'retry_after' => $e->retryAfter,
                'error_key' => $e->errors[0]['error_key'], 'error_message' => $e->errors[0]['error_message'],
            ]);
            fwrite(STDERR, "[{$opts['id']} #$i] HTTP {$e->status}: {$e->errors[0]['error_key']}: {$e->errors[0]['error_message']}\n");
            if ($e->errors[0]['error_key'] !== 'mashery.not.authorized.over.qps'
                || $line['attempts'] > (int) $opts['max-retries']) {
                return $line;
            }
            sleep(1);
        }
    }
}

function main(array $argv): int
{
    $opts = parse_args($argv);
    Config::$props['base_url'] = rtrim($opts['base'], '/') . '/v2/';
    $id = $opts['id'];
    $count = (int) $opts['count'];

    for ($i = 0; $i < $count; $i++) {
        $contact = json_encode([
            'lists' => [['id' => '1']],
            'email_addresses' => [['email_address' => "$id-$i@example.com"]],
            'first_name' => "First$i",
            'last_name' => $id,
        ]);
        $line = call($opts, $i, 'POST', 'contacts?action_by=ACTION_BY_OWNER', 'application/json', $contact);
        echo json_encode($line, JSON_OUTPUT_FLAGS), "\n";
        flush();
    }

    $csv = "EMAIL,FIRST NAME,LAST NAME\r\n";
    for ($r = 0; $r < (int) $opts['rows']; $r++) {
        $csv .= "$id-bulk-$r@example.com,Bulk$r,$id\r\n";
    }
    $boundary = '----ctctproxyexample' . hash('crc32b', $id);
    $body = multipart_body($boundary, ['file_name' => 'contacts.csv', 'lists' => '1'], 'data', 'contacts.csv', $csv);
    $line = call($opts, $count, 'POST', 'activities/addcontacts', "multipart/form-data; boundary=$boundary", $body);
    echo json_encode($line, JSON_OUTPUT_FLAGS), "\n";
    return 0;
}

try {
    exit(main($argv));
} catch (Throwable $e) {
    fwrite(STDERR, 'v2_client.php failed: ' . get_class($e) . ': ' . $e->getMessage() . "\n");
    exit(1);
}
