"""The HTTP server: the FastAPI app, the native and OpenAI routes, request schemas, metrics, the playground."""
