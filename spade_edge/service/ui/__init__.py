"""The operator's page (``serve --ui``): index.html, app.js and style.css, served as they are by
spade_edge/service/station.py. No build step, no library, nothing fetched from elsewhere."""
