"""The review web UI and REST API (FastAPI): `app.web.app.create_app`, `facemoe serve`.

Layout: `auth` (users, tokens, sessions, CSRF), `context` (the services of one server),
`deps` (FastAPI dependencies), `models` (request/response bodies), `routers/` (one per
resource: events, clusters, identities, recognize, cameras; `pages` for the HTML), and
`templates/` + `static/` (Jinja2 and CSS, packaged with the code; no build step).
"""
