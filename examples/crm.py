"""A tiny CRM that embeds genesy-tasks: the README's Embedding section, runnable.

Contacts and activities live in the CRM's own tables; Genesy's tasks in the
same SQLite file, through genesy_tasks (vendored: one file beside this one, or
pip-installed). The CRM shows:

- the Genesy API served under /genesy, answered whole by the API (mount);
- a contact page that lists the contact's tasks through TaskStore;
- a validator that refuses tasks for contacts the CRM does not know;
- a subscriber that records an activity when a task is completed.

    python examples/crm.py        # http://127.0.0.1:8000; Genesy's base URL: .../genesy
    genesy-tasks check http://127.0.0.1:8000/genesy --api-key KEY --contact-id contact-1

Settings: CRM_DB (default crm.db), CRM_PORT (default 8000), and genesy-tasks'
own GENESY_API_KEY (else a key is generated, kept in the file and printed).
"""

import contextlib
import html
import os
import sqlite3
import sys

import bottle

# Vendored, genesy_tasks.py sits beside this file; in a checkout of
# genesy-tasks, one directory up (preferred to an installed copy).
_CHECKOUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
if os.path.exists(os.path.join(_CHECKOUT, "genesy_tasks.py")):
    sys.path.insert(1, _CHECKOUT)

from genesy_tasks import TaskStore, TaskValidationError, make_app, mount  # noqa: E402

CRM_SCHEMA = """
CREATE TABLE IF NOT EXISTS contacts (
    id    TEXT PRIMARY KEY,
    name  TEXT NOT NULL,
    email TEXT
);
CREATE TABLE IF NOT EXISTS activities (
    id         INTEGER PRIMARY KEY,
    contact_id TEXT,
    task_id    TEXT NOT NULL UNIQUE,  -- one activity per completed task
    text       TEXT NOT NULL,
    at         TEXT NOT NULL
);
"""
EXAMPLE_CONTACTS = [("contact-1", "Ada Lovelace", "ada@example.com"),
                    ("contact-2", "Grace Hopper", "grace@example.com")]


class CRM:
    """The CRM's data, and its web application with Genesy's API mounted."""

    def __init__(self, path, api_keys=None):
        self.path = path
        # The CRM refuses, and records, through the store that the API uses.
        # Opened first, it creates a new file readable by its owner only: the
        # file will hold the API key generated for it.
        self.tasks = TaskStore(path, validate=self.refuse_unknown_contacts)
        with self.database() as db:
            db.executescript(CRM_SCHEMA)
        self.tasks.subscribe(self.record_completions)
        self.api = make_app(self.tasks, api_keys=api_keys)
        self.web = bottle.Bottle()
        self.web.get("/", callback=self.contacts_page)
        self.web.get("/contacts/<contact_id>", callback=self.contact_page)
        # Below /genesy the API answers alone: its JSON errors, none of the
        # CRM's hooks or error pages.
        self.application = mount(self.web, "/genesy", self.api)

    @contextlib.contextmanager
    def database(self):
        """A connection to the CRM's tables, committed on success. SQLite
        connections are cheap; the subscriber's thread opens its own."""
        db = sqlite3.connect(self.path, timeout=5)
        try:
            with db:
                yield db
        finally:
            db.close()

    def add_contact(self, contact_id, name, email=None):
        with self.database() as db:
            db.execute("INSERT OR IGNORE INTO contacts VALUES (?, ?, ?)",
                       (contact_id, name, email))

    # -- what the CRM adds to Genesy's tasks --------------------------------

    def refuse_unknown_contacts(self, task, previous):
        """TaskStore's validator: a task may only name a contact the CRM knows.

        Only a contactId that the write sets or changes is looked up, so a
        task whose contact was deleted since can still be completed.
        """
        contact_id = task["contactId"]
        if contact_id is None or (previous is not None and previous["contactId"] == contact_id):
            return
        with self.database() as db:
            known = db.execute("SELECT 1 FROM contacts WHERE id = ?", (contact_id,)).fetchone()
        if known is None:
            raise TaskValidationError("contactId %r is not a contact of this CRM" % contact_id)

    def record_completions(self, changes):
        """A subscriber: an activity on the contact for each task just completed."""
        with self.database() as db:
            for change in changes:
                task = change["task"]
                # Completed by this very change: completing sets both at once.
                if task and task["completed"] and task["completedAt"] == task["updatedAt"]:
                    db.execute("INSERT OR IGNORE INTO activities (contact_id, task_id, text, at) "
                               "VALUES (?, ?, ?, ?)",
                               (task["contactId"], task["id"],
                                "Completed: %s" % task["subject"], change["at"]))

    def activities(self, contact_id):
        with self.database() as db:
            return db.execute("SELECT text, at FROM activities WHERE contact_id = ? "
                              "ORDER BY id DESC", (contact_id,)).fetchall()

    # -- pages ------------------------------------------------------------------

    def contacts_page(self):
        with self.database() as db:
            contacts = db.execute("SELECT id, name FROM contacts ORDER BY name").fetchall()
        items = "".join('<li><a href="/contacts/%s">%s</a></li>'
                        % (html.escape(contact_id, True), html.escape(name))
                        for contact_id, name in contacts)
        return _page("Contacts", "<ul>%s</ul><p>Genesy's API: /genesy</p>" % items)

    def contact_page(self, contact_id):
        with self.database() as db:
            contact = db.execute("SELECT name, email FROM contacts WHERE id = ?",
                                 (contact_id,)).fetchone()
        if contact is None:
            bottle.response.status = 404
            return _page("Not found", "<p>No such contact.</p>")
        # Task fields come from Genesy: escaped like any untrusted text.
        tasks = self.tasks.list(contact_id=contact_id, limit=100)["tasks"]
        rows = "".join("<tr><td>%s</td><td>%s</td><td>%s</td></tr>" % (
            html.escape(task["subject"]), html.escape(task["dueDate"] or ""),
            "done" if task["completed"] else "open") for task in tasks)
        activities = "".join("<li>%s (%s)</li>" % (html.escape(text), html.escape(at))
                             for text, at in self.activities(contact_id))
        return _page(contact[0], "<p>%s</p><h2>Tasks</h2><table>%s</table>"
                                 "<h2>Activities</h2><ul>%s</ul>"
                     % (html.escape(contact[1] or ""), rows, activities))

    def close(self):
        self.api.close()  # and its store, after the subscriber has had every change


def _page(title, body):
    return ("<!doctype html><meta charset=utf-8><title>%s</title><h1>%s</h1>%s"
            % (html.escape(title), html.escape(title), body))


def main():
    path = os.environ.get("CRM_DB", "crm.db")
    port = int(os.environ.get("CRM_PORT", "8000"))
    crm = CRM(path, api_keys=os.environ.get("GENESY_API_KEY"))
    for contact in EXAMPLE_CONTACTS:
        crm.add_contact(*contact)
    if not os.environ.get("GENESY_API_KEY"):
        print("Genesy API key (generated, kept in %s): %s"
              % (path, crm.tasks.generated_api_key()))
    print("Genesy's base URL: http://127.0.0.1:%d/genesy" % port, flush=True)
    try:
        bottle.run(crm.application, host="127.0.0.1", port=port)
    finally:
        crm.close()


if __name__ == "__main__":
    main()
