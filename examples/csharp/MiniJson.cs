// Just enough JSON for the example clients: parse an answer body, write one output line.
// Stock Mono ships neither System.Web.Extensions nor System.Text.Json, and the v2 .NET SDK
// carried its own (de)serialiser too. Compiled into V2Client.exe and V3Client.exe.
using System;
using System.Collections.Generic;
using System.Globalization;
using System.Security.Cryptography;
using System.Text;

static class MiniJson
{
    /// <summary>Parse JSON into Dictionary / List / string / double / bool / null; throws FormatException.</summary>
    public static object Parse(string text)
    {
        int pos = 0;
        try
        {
            object value = ParseValue(text, ref pos);
            SkipWhitespace(text, ref pos);
            if (pos != text.Length) throw new FormatException("trailing characters at " + pos);
            return value;
        }
        catch (ArgumentOutOfRangeException) { throw new FormatException("unexpected end of JSON"); }
        catch (IndexOutOfRangeException) { throw new FormatException("unexpected end of JSON"); }
    }

    static object ParseValue(string s, ref int pos)
    {
        SkipWhitespace(s, ref pos);
        if (pos >= s.Length) throw new FormatException("unexpected end of JSON");
        char c = s[pos];
        if (c == '{')
        {
            var obj = new Dictionary<string, object>();
            pos++;
            SkipWhitespace(s, ref pos);
            if (s[pos] == '}') { pos++; return obj; }
            while (true)
            {
                SkipWhitespace(s, ref pos);
                string key = ParseString(s, ref pos);
                SkipWhitespace(s, ref pos);
                Expect(s, ref pos, ':');
                obj[key] = ParseValue(s, ref pos);
                SkipWhitespace(s, ref pos);
                if (s[pos] == ',') { pos++; continue; }
                Expect(s, ref pos, '}');
                return obj;
            }
        }
        if (c == '[')
        {
            var list = new List<object>();
            pos++;
            SkipWhitespace(s, ref pos);
            if (s[pos] == ']') { pos++; return list; }
            while (true)
            {
                list.Add(ParseValue(s, ref pos));
                SkipWhitespace(s, ref pos);
                if (s[pos] == ',') { pos++; continue; }
                Expect(s, ref pos, ']');
                return list;
            }
        }
        if (c == '"') return ParseString(s, ref pos);
        foreach (var literal in new[] { "true", "false", "null" })
        {
            if (string.CompareOrdinal(s, pos, literal, 0, literal.Length) == 0)
            {
                pos += literal.Length;
                return literal == "null" ? null : (object)(literal == "true");
            }
        }
        int start = pos;
        while (pos < s.Length && "+-0123456789.eE".IndexOf(s[pos]) >= 0) pos++;
        if (start == pos) throw new FormatException("unexpected '" + c + "' at " + pos);
        return double.Parse(s.Substring(start, pos - start), CultureInfo.InvariantCulture);
    }

    static string ParseString(string s, ref int pos)
    {
        Expect(s, ref pos, '"');
        var sb = new StringBuilder();
        while (true)
        {
            if (pos >= s.Length) throw new FormatException("unterminated string");
            char c = s[pos++];
            if (c == '"') return sb.ToString();
            if (c != '\\') { sb.Append(c); continue; }
            char e = s[pos++];
            switch (e)
            {
                case 'n': sb.Append('\n'); break;
                case 't': sb.Append('\t'); break;
                case 'r': sb.Append('\r'); break;
                case 'b': sb.Append('\b'); break;
                case 'f': sb.Append('\f'); break;
                case 'u': sb.Append((char)Convert.ToInt32(s.Substring(pos, 4), 16)); pos += 4; break;
                default: sb.Append(e); break;
            }
        }
    }

    static void SkipWhitespace(string s, ref int pos)
    {
        while (pos < s.Length && char.IsWhiteSpace(s[pos])) pos++;
    }

    static void Expect(string s, ref int pos, char c)
    {
        if (pos >= s.Length || s[pos] != c) throw new FormatException("expected '" + c + "' at " + pos);
        pos++;
    }

    /// <summary>Write a flat object of strings, numbers and nulls as one JSON line.</summary>
    public static string Write(IEnumerable<KeyValuePair<string, object>> fields)
    {
        var parts = new List<string>();
        foreach (var field in fields)
            parts.Add(Quote(field.Key) + ":" + WriteValue(field.Value));
        return "{" + string.Join(",", parts) + "}";
    }

    static string WriteValue(object value)
    {
        if (value == null) return "null";
        if (value is int || value is long) return Convert.ToString(value, CultureInfo.InvariantCulture);
        return Quote(value.ToString());
    }

    static string Quote(string s)
    {
        var sb = new StringBuilder("\"");
        foreach (char c in s)
        {
            if (c == '"' || c == '\\') sb.Append('\\').Append(c);
            else if (c < ' ') sb.AppendFormat("\\u{0:x4}", (int)c);
            else sb.Append(c);
        }
        return sb.Append('"').ToString();
    }

    /// <summary>Lower-case hex SHA-256, the format the simulator echoes.</summary>
    public static string Sha256Hex(byte[] data)
    {
        using (var sha = SHA256.Create())
            return BitConverter.ToString(sha.ComputeHash(data)).Replace("-", "").ToLowerInvariant();
    }

    /// <summary>The echo's body_sha256 from a 2xx body, or null when the body is not an echo.</summary>
    public static string EchoedSha256(string body)
    {
        try
        {
            var echo = Parse(body) as Dictionary<string, object>;
            object sha;
            return echo != null && echo.TryGetValue("body_sha256", out sha) ? sha as string : null;
        }
        catch (FormatException) { return null; }
    }
}
