//! Error reporting: an error with every cause it carries, for logs and answers.

/// `e` and its sources, joined with `: `.
pub(crate) fn source_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
