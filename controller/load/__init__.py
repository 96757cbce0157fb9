"""Engine load -> endpoint weights: `weights` decides them (pure), `cluster` watches and scrapes
a cluster's engine pods. Parsing and fetching are the core's (`arks.engine_metrics`,
`arks.adapters.scrape`)."""
