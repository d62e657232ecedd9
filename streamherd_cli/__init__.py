"""``streamherd``: the operator's command-line tool. It speaks to the orchestrator over
HTTP and its WebSocket only (the wire contract), never by importing it."""
