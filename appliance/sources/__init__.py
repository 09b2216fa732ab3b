"""Log sources: turn mail-log lines into MailEvents for the profiler."""
