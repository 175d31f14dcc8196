"""Built-in plugins of the DTMF gateway (installed as dtmf_service.builtin_plugins)."""
