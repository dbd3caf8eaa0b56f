"""__domain__: a new domain of the toolkit (started from tools/domain_template)."""
