import Checkpoint
import Foundation
import PhalanxCUDA
import PhalanxTraining
import Testing

/// The `phalanx` binary built beside this test bundle.
private let binary = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
    .deletingLastPathComponent().appendingPathComponent("phalanx")

/// Runs `phalanx arguments`; `whileRunning` is called with the process once it started.
/// Returns the exit status and the output (stdout and stderr together).
@discardableResult
private func phalanx(_ arguments: [String], whileRunning: (Process) -> Void = { _ in }) throws -> (status: Int32, output: String) {
    let process = Process()
    process.executableURL = FileManager.default.fileExists(atPath: binary.path)
        ? binary : binary.deletingLastPathComponent().appendingPathComponent("release/phalanx")
    process.arguments = arguments
    let output = FileManager.default.temporaryDirectory.appendingPathComponent("phalanx-out-\(UUID().uuidString)")
    FileManager.default.createFile(atPath: output.path, contents: nil)
    defer { try? FileManager.default.removeItem(at: output) }
    let handle = try FileHandle(forWritingTo: output)
    process.standardOutput = handle
    process.standardError = handle
    try process.run()
    whileRunning(process)
    process.waitUntilExit()
    try handle.close()
    return (process.terminationStatus, String(decoding: try Data(contentsOf: output), as: UTF8.self))
}

/// A fresh folder holding `corpus.txt` of `lines` generated lines.
private func folderWithCorpus(lines: Int = 300) throws -> URL {
    let folder = FileManager.default.temporaryDirectory.appendingPathComponent("phalanx-cli-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
    try String(repeating: "one two three four five six seven\n", count: lines)
        .write(to: folder.appendingPathComponent("corpus.txt"), atomically: true, encoding: .utf8)
    return folder
}

/// Flags of a train run that takes a second.
private func quickRun(_ folder: URL, _ extra: [String] = []) -> [String] {
    ["train", "--data", folder.appendingPathComponent("corpus.txt").path, "--run", folder.appendingPathComponent("run").path,
     "--preset", "transformer-tiny", "--depth", "1", "--steps", "2", "--batch-size", "1", "--context", "8",
     "--eval-batches", "1", "--sample", "0"] + extra
}

@Suite("The command line: hostile flags are refused by name, runs are never damaged", .serialized)
struct CommandLineSafetyTests {
    @Test("refused train flags name the flag and its range and leave no run folder", arguments: [
        ["--batch-size", "100000000"], ["--dropout=-0.1"], ["--steps", "0"], ["--learning-rate", "nan"], ["--window", "0"],
        ["--clip", "inf"], ["--eval-batches", "0"], ["--gate-scale", "2"], ["--context", "9223372036854775807"],
        ["--minutes", "1"], ["--device", "gpu"], ["--precision", "fp8"], ["--validation-data", "/nonexistent/held-out.txt"],
        ["--gpus", "0"], ["--gpus", "2"], ["--collective-timeout", "0"], ["--batch-size", "3", "--gpus", "2", "--device", "cuda"], ["--distill-steps", "5"],
    ])
    func refusedFlags(flags: [String]) throws {
        let folder = try folderWithCorpus()
        defer { try? FileManager.default.removeItem(at: folder) }
        let flag = flags[0].split(separator: "=")[0]
        let (status, output) = try phalanx(quickRun(folder, flags))
        #expect(status != 0)
        #expect(output.contains("Error: \(flag)"), "\(output)")
        #expect(!FileManager.default.fileExists(atPath: folder.appendingPathComponent("run").path))
    }

    @Test("--device cuda where there is no GPU says why, and leaves no run folder",
          .enabled(if: !CUDAContext.isAvailable, "this machine has a CUDA device"))
    func cudaWithoutGPU() throws {
        let folder = try folderWithCorpus()
        defer { try? FileManager.default.removeItem(at: folder) }
        let (status, output) = try phalanx(quickRun(folder, ["--device", "cuda"]))
        #expect(status != 0)
        #expect(output.contains("--device cuda: CUDA unavailable"), "\(output)")
        #expect(!FileManager.default.fileExists(atPath: folder.appendingPathComponent("run").path))
        let (gpusStatus, gpusOutput) = try phalanx(quickRun(folder, ["--device", "cuda", "--gpus", "2", "--batch-size", "2"]))
        #expect(gpusStatus != 0)
        #expect(gpusOutput.contains("--gpus 2: CUDA unavailable"), "\(gpusOutput)")
        #expect(!FileManager.default.fileExists(atPath: folder.appendingPathComponent("run").path))
    }

    @Test("generate --prompts writes one JSON line per prompt; a bad prompts line is refused by number")
    func promptsFile() throws {
        let folder = try folderWithCorpus()
        defer { try? FileManager.default.removeItem(at: folder) }
        #expect(try phalanx(quickRun(folder)).status == 0)
        let checkpoint = folder.appendingPathComponent("run/checkpoint.safetensors").path
        let prompts = folder.appendingPathComponent("prompts.txt"), out = folder.appendingPathComponent("out.jsonl")
        try "one two\n{\"prompt\": \"three\", \"max_tokens\": 2}\nfour\n".write(to: prompts, atomically: true, encoding: .utf8)
        let (status, output) = try phalanx(["generate", "--checkpoint", checkpoint, "--prompts", prompts.path, "--out", out.path,
                                            "--batch-size", "2", "--max-tokens", "5"])
        #expect(status == 0, "\(output)")
        let lines = try String(contentsOf: out, encoding: .utf8).split(separator: "\n")
        #expect(lines.count == 3)
        let objects = lines.compactMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
        #expect(objects.map { $0["index"] as? Int } == [0, 1, 2])
        #expect(objects.map { $0["tokens"] as? Int } == [5, 2, 5])
        try "fine\n{\"prompt\": 1}\n".write(to: prompts, atomically: true, encoding: .utf8)
        let refused = try phalanx(["generate", "--checkpoint", checkpoint, "--prompts", prompts.path])
        #expect(refused.status != 0 && refused.output.contains("prompts line 2"), "\(refused.output)")
    }

    @Test("horizon answers at the limits of its flags instead of trapping, and quickly", arguments: [
        ["--eps", "5e-324"], ["--block-length", "9223372036854775807"], ["--rho", "0.9999999999999999", "--eps", "1e-300"],
    ])
    func horizonLimits(flags: [String]) throws {
        let start = Date()
        let (status, output) = try phalanx(["horizon"] + flags)
        #expect(status == 0, "\(output)")
        #expect(output.contains("Horizon:"))
        #expect(Date().timeIntervalSince(start) < 5)
    }

    @Test("train refuses to replace a checkpoint; --resume --steps extends; inspect shows a huge elapsed time without trapping")
    func replaceExtendInspect() throws {
        let folder = try folderWithCorpus()
        defer { try? FileManager.default.removeItem(at: folder) }
        let run = folder.appendingPathComponent("run")
        #expect(try phalanx(quickRun(folder)).status == 0)
        let checkpoint = try Data(contentsOf: TrainingRun.checkpointURL(in: run))
        let refused = try phalanx(quickRun(folder))
        #expect(refused.status != 0 && refused.output.contains("--resume or --overwrite"), "\(refused.output)")
        #expect(try Data(contentsOf: TrainingRun.checkpointURL(in: run)) == checkpoint)

        let extended = try phalanx(["train", "--resume", "--run", run.path, "--steps", "4", "--sample", "0"])
        #expect(extended.status == 0 && extended.output.contains("from 2 to 4 steps"), "\(extended.output)")

        // A finite but absurd elapsed time (1e300 s) is shown as unknown, not converted to Int.
        let file = try SafetensorsFile(contentsOf: TrainingRun.checkpointURL(in: run))
        var writer = SafetensorsWriter()
        for (name, info) in file.tensors.sorted(by: { $0.value.byteRange.lowerBound < $1.value.byteRange.lowerBound }) {
            writer.add(name, dtype: info.dtype, shape: info.shape, bytes: try file.bytes(name))
        }
        writer.metadata = file.metadata
        var state = try JSONSerialization.jsonObject(with: Data(file.metadata["training_state"]!.utf8)) as! [String: Any]
        state["elapsedSeconds"] = 1e300
        writer.metadata["training_state"] = String(decoding: try JSONSerialization.data(withJSONObject: state), as: UTF8.self)
        let edited = folder.appendingPathComponent("elapsed.safetensors")
        try writer.write(to: edited)
        let inspected = try phalanx(["inspect", edited.path])
        #expect(inspected.status == 0 && inspected.output.contains("--:-- elapsed"), "\(inspected.output)")
    }

    @Test("a run that diverges before its first checkpoint says that nothing was kept")
    func divergenceMessage() throws {
        let folder = try folderWithCorpus()
        defer { try? FileManager.default.removeItem(at: folder) }
        let (status, output) = try phalanx(quickRun(folder, ["--learning-rate", "1e30", "--warmup", "0", "--checkpoint-every", "0"]))
        #expect(status != 0)
        #expect(output.contains("no checkpoint had been written yet") && !output.contains("was kept"), "\(output)")
    }

    @Test("Ctrl-C while the corpus is tokenized exits with 130 and leaves no half-written file")
    func interruptDuringTokenizing() throws {
        let folder = try folderWithCorpus(lines: 1_500_000)
        defer { try? FileManager.default.removeItem(at: folder) }
        let run = folder.appendingPathComponent("run")
        let (status, output) = try phalanx(quickRun(folder)) { process in
            let deadline = Date().addingTimeInterval(30)
            while stalePartialFiles(in: run).isEmpty && process.isRunning && Date() < deadline { usleep(1000) }
            process.interrupt()
        }
        #expect(status == 130, "\(output)")
        #expect(stalePartialFiles(in: run).isEmpty)
        #expect(!FileManager.default.fileExists(atPath: TrainingRun.checkpointURL(in: run).path))
    }
}
