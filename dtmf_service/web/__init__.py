"""The HTTP layer: the blueprint, caller authentication, body reading, JSON errors, schemas, OpenAPI."""
