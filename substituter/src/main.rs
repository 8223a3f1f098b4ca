//! Placeholder: this binary's behaviour is not built yet. It says so and exits non-zero
//! so that nothing configured to call it silently pretends to work.
fn main() {
    eprintln!(
        "{}: not implemented yet in this Ferry build; see the README for what works today",
        env!("CARGO_PKG_NAME")
    );
    std::process::exit(2);
}
