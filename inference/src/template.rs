//! Chat templates shipped with models (Jinja), rendered with minijinja. (Being written.)
