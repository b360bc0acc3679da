"""What people talk to: the OpenAI-compatible HTTP API, the chat page, the terminal chat, the
generated text on stdout, and the demo."""
