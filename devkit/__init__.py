"""Test and benchmark support: process launchers, a fake clock, scratch databases, the
fake orchestrator. Imported by ``tests/`` and ``bench/``; never by the product packages."""
