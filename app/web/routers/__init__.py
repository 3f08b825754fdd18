"""One router per resource; each only turns HTTP into calls of the services the CLI uses."""
