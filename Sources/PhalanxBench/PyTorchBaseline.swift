import Foundation
import PhalanxRuntime

/// The PyTorch figures of `scripts/torch-cpu-bench.py` (the same models and layers, float32 on the
/// CPU with this pool's thread count), measured in the same run as the Swift figures they are
/// compared with. Optional: without Python or torch the reports say why and go on without them.
///
/// PyTorch picks its vector code at run time from the processor, while this binary's was fixed
/// when it was built. An AVX2 build (`PHALANX_PORTABLE=1`) therefore limits PyTorch's CPU
/// kernels to AVX2 as well (`cpuLimits`), so that on an AVX-512 processor the comparison is the
/// one an AVX2-only processor would show; the report names the code PyTorch ran.
public struct PyTorchBaseline: Sendable {
    /// The script's path.
    public var script: String
    /// The Python interpreter: `PHALANX_PYTHON` if set, else `python3` from the path.
    public var python: String

    /// A baseline run by `python` (default: `PHALANX_PYTHON`, else `python3`) from `script`.
    public init(script: String = "scripts/torch-cpu-bench.py", python: String? = nil) {
        self.script = script
        self.python = python ?? ProcessInfo.processInfo.environment["PHALANX_PYTHON"] ?? "python3"
    }

    /// The script's `results` for `arguments` (its mode and flags; `--threads` is added when
    /// `threads`, for the CPU scripts), or nil after printing why there are none (no interpreter,
    /// no torch, a failed run).
    func results(_ arguments: [String], threads: Bool = true) -> (version: String, results: [[String: Any]])? {
        guard FileManager.default.fileExists(atPath: script) else {
            print("  PyTorch baseline: \(script) not found (run from the package root, or pass its path)")
            return nil
        }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = [python, script] + arguments + (threads ? ["--threads", "\(WorkerPool.shared.threadCount)"] : [])
        if threads {
            process.environment = ProcessInfo.processInfo.environment.merging(Self.cpuLimits) { _, limit in limit }
        }
        let output = Pipe()
        process.standardOutput = output
        do { try process.run() } catch {
            print("  PyTorch baseline: could not start \(python): \(error)")
            return nil
        }
        let data = output.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        let line = String(decoding: data, as: UTF8.self).split(separator: "\n").last.map(String.init) ?? ""
        guard let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else {
            print("  PyTorch baseline: \(python) \(script) exited with status \(process.terminationStatus) and no JSON line")
            return nil
        }
        if let error = object["error"] as? String {
            print("  PyTorch baseline: \(error) (pip install torch, or set PHALANX_PYTHON to an interpreter that has it)")
            return nil
        }
        guard let results = object["results"] as? [[String: Any]] else {
            print("  PyTorch baseline: the JSON line has no results")
            return nil
        }
        let capability = (object["capability"] as? String).map { ", CPU code \($0)" } ?? ""
        return ((object["torch"] as? String ?? "?") + capability, results)
    }

    /// The environment that caps PyTorch's CPU kernels at this build's instruction set: ATen's
    /// own kernels, MKL's and oneDNN's (each reads its variable when it loads). Empty for a build
    /// with AVX-512 and off x86.
    static var cpuLimits: [String: String] {
        #if arch(x86_64)
        if !hasWideRegisters {
            return ["ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2"]
        }
        #endif
        return [:]
    }
}
