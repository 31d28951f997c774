fn main() {
    eprintln!("migrate-cli: not yet");
    std::process::exit(2);
}
