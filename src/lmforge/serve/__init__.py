"""`lmforge serve`: an OpenAI-compatible HTTP server over the one inference engine."""
