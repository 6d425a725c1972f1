"""The path of an event: request facts → pipeline → Redis buffer → batch writer."""
