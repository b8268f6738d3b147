"""What ``flowrra-node --app shop.worker:app`` imports: Django first, then the tasks.

Run the node from the project directory (the one holding ``manage.py``), with the same
settings as the web process::

    DJANGO_SETTINGS_MODULE=mysite.settings flowrra-node --app shop.worker:app \
        --broker tcp://broker-host:5555
"""

import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
django.setup()  # before the tasks module, which reads the settings when it is imported

from shop.tasks import app  # noqa: E402

__all__ = ["app"]
