"""Who may do what: authentication, login back-off, access rules and limits."""
