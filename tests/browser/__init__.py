"""Browser tests: the web view in Debian's chromium, driven by Playwright."""
