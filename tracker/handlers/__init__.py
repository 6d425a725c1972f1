"""HTTP handlers: parse, call, answer. Nothing here decides what is recorded."""
