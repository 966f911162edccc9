import ArgumentParser
import Foundation
import PhalanxTraining

struct FuzzCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "fuzz-checkpoints",
        abstract: "Feed hostile variants of a small checkpoint to the loader; every one must load or be refused with an error.",
        discussion: """
        Mutations: truncation, byte flips in header and data, NaN and infinite weights, header-length \
        and offset edits, malformed JSON, wrong dtypes, overflowing shapes, hostile configuration \
        values. A crash stops the command (the case is reproducible from --seed).
        """)

    @Option(help: "Cases to run, at least 1.") var cases = 100_000
    @Option(help: "Seed of the mutations.") var seed: UInt64 = 1

    func validate() throws {
        guard cases >= 1 else { throw ValidationError("--cases must be at least 1; got \(cases).") }
    }

    func run() throws {
        let report = try CheckpointFuzzing.run(cases: cases, seed: seed) { r in
            print("\r\(r.cases) cases, \(r.refused) refused, \(r.accepted) accepted, \(String(format: "%.0f", r.seconds)) s", terminator: "")
            fflush(nil)
        }
        print("\r\(report)")
        for (mutation, message) in report.examples.sorted(by: { $0.key.rawValue < $1.key.rawValue }) {
            print("  e.g. \(mutation.rawValue): \(message.prefix(220))")
        }
        for message in report.vagueMessages { print("  vague: \(message)") }
        if !report.vagueMessages.isEmpty { throw ExitCode(1) }
    }
}
