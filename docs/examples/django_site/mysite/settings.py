"""Settings of the example site. Only what the Flowrra recipe needs: no database, no sessions."""

import os

# A real project reads its secret from the environment or a vault.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "django-insecure-flowrra-example")
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
ALLOWED_HOSTS = ["localhost", "127.0.0.1"]

INSTALLED_APPS = ["shop"]
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
ROOT_URLCONF = "mysite.urls"
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True

# The receipts the tasks send are printed by whoever runs them: the node (or, with the
# embedded default, the web process).
EMAIL_BACKEND = "django.core.mail.backends.console.EmailBackend"
DEFAULT_FROM_EMAIL = "shop@example.com"
SHOP_NAME = "The Example Shop"

# The broker's ROUTER endpoint, such as "tcp://broker-host:5555". Unset, the broker and a node
# run inside the web process itself: fine for runserver, wrong for several web processes
# (each would have a broker of its own).
FLOWRRA_BROKER = os.environ.get("FLOWRRA_BROKER") or None
