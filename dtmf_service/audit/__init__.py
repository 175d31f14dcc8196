"""The audit trail (CONTRACT.md section 7): the event, the crash-proof outbox and its delivery to sinks."""
