// The process wrapper both example clients share: run, report a crash, exit promptly.
// Compiled into V2Client.exe and V3Client.exe.
using System;
using System.Runtime.InteropServices;
using System.Threading.Tasks;

static class ClientProcess
{
    [DllImport("libc", EntryPoint = "_exit")]
    static extern void LibcExit(int status);

    /// <summary>Run the client's async main; a crash is exit status 1 with the exception on stderr.</summary>
    public static int Main(string name, string[] args, Func<string[], Task<int>> run)
    {
        int code;
        try
        {
            code = run(args).GetAwaiter().GetResult();
        }
        catch (Exception e)
        {
            Console.Error.WriteLine(name + " failed: " + e);
            code = 1;
        }
        return Exit(code);
    }

    /// <summary>Flush and leave at once. After Main returns, Mono 6.8 sometimes sits in its
    /// runtime cleanup for 15-60 s waiting on a parked thread-pool worker (Environment.Exit
    /// too); on Mono/Unix skip that cleanup, since everything has been written.</summary>
    static int Exit(int code)
    {
        Console.Out.Flush();
        Console.Error.Flush();
        if (Type.GetType("Mono.Runtime") != null && Environment.OSVersion.Platform == PlatformID.Unix)
            LibcExit(code);
        return code;
    }
}
