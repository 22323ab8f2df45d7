"""The HTTP edge: the OpenAI, admin and health routers, their protocol, serving logic and errors."""
