"""Everything that talks to NICE CXone: the client and its retries, tokens, the transport, the dialects.

Nothing here knows the gateway's own HTTP API: the client reports what CXone did
(``Submission``) and ``dtmf_service.parse`` decides what the caller is answered.
"""
