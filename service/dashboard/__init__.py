"""The web dashboard: static pages and JavaScript served by the API, which stays the single
source of truth (the pages call the same /v1 routes as everyone, with the user's key)."""
