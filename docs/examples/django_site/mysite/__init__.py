"""The example Django project: settings and URLs (the shop app holds the Flowrra code)."""
