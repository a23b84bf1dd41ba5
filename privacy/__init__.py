"""Privacy: accountants, events, per-site ledger, budgets and policy, audit, keys."""
