// swift-tools-version: 6.1
import PackageDescription

// Vector code needs the target CPU's instruction set at compile time: without it Swift lowers
// `SIMD16<Float>` fused multiply-adds to scalar `fmaf` calls (measured 40x slower). The default
// build targets the host (`-march=native`); `PHALANX_PORTABLE=1` builds for x86-64-v3 (AVX2+FMA,
// any x86 server of the last decade) instead, which is what the binary for another machine
// (the GPU host) needs, and `PHALANX_MARCH=<cpu>` any other clang target (`x86-64-v4` for
// AVX-512 machines of any vendor, `znver3`, `sapphirerapids`). These are `unsafeFlags`: fine for the root package, which is how Phalanx
// is meant to be used (a tool and a library you vendor), but they stop SwiftPM from accepting it
// as a versioned dependency. See README, "Build flags".
let portable = Context.environment["PHALANX_PORTABLE"].map { $0 == "1" } ?? false
let march = Context.environment["PHALANX_MARCH"] ?? (portable ? "x86-64-v3" : "native")
let cpuFlags: [SwiftSetting] = [
    .unsafeFlags(["-Xcc", "-march=\(march)"],
                 .when(platforms: [.linux])),
]

let package = Package(
    name: "Phalanx",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "SWR", targets: ["SWR"]),
        .library(name: "Checkpoint", targets: ["Checkpoint"]),
        .library(name: "PhalanxLayers", targets: ["PhalanxLayers"]),
        .executable(name: "phalanx", targets: ["phalanx"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    ],
    targets: [
        .systemLibrary(
            name: "CBLAS", path: "Sources/CBLAS", pkgConfig: "openblas",
            providers: [.apt(["libopenblas-dev"])]),
        .target(name: "CPhalanxIntrinsics"),
        // NCCL's types and entry-point signatures for calls through dlsym'd pointers (nothing linked).
        .target(name: "CNCCL"),
        .target(name: "PhalanxRuntime", dependencies: ["CPhalanxIntrinsics"], swiftSettings: cpuFlags),
        .target(name: "SWR", dependencies: ["PhalanxRuntime", "CPhalanxIntrinsics"], swiftSettings: cpuFlags),
        .target(name: "Checkpoint", dependencies: ["PhalanxRuntime"], swiftSettings: cpuFlags),
        .target(name: "PhalanxData", dependencies: ["PhalanxRuntime"], swiftSettings: cpuFlags),
        .target(name: "PhalanxCUDA", dependencies: ["SWR", "PhalanxRuntime", "CNCCL"], resources: [.copy("Kernels")], swiftSettings: cpuFlags),
        // The GPU-against-CPU comparisons, shared by the tests and `phalanx bench cuda --check`.
        .target(
            name: "PhalanxCUDAChecks",
            dependencies: ["PhalanxCUDA", "SWR", "PhalanxLayers", "PhalanxModels", "PhalanxTraining", "PhalanxRuntime"],
            swiftSettings: cpuFlags),
        .target(
            name: "PhalanxLayers",
            dependencies: [
                "SWR", "Checkpoint", "PhalanxRuntime", "CPhalanxIntrinsics", "PhalanxCUDA",
                .target(name: "CBLAS", condition: .when(platforms: [.linux])),
            ],
            swiftSettings: cpuFlags),
        .target(
            name: "PhalanxModels", dependencies: ["PhalanxLayers", "PhalanxCUDA", "SWR", "PhalanxRuntime", "Checkpoint"],
            swiftSettings: cpuFlags),
        .target(
            name: "PhalanxTraining",
            dependencies: ["PhalanxModels", "PhalanxLayers", "PhalanxCUDA", "PhalanxData", "PhalanxDistributed", "PhalanxRuntime", "Checkpoint"],
            swiftSettings: cpuFlags),
        // Data parallelism: launch variables, rendezvous, communicators (NCCL, in-process), bucket plan.
        .target(
            name: "PhalanxDistributed", dependencies: ["PhalanxCUDA", "PhalanxLayers", "PhalanxRuntime"],
            swiftSettings: cpuFlags),
        .target(
            name: "PhalanxBench",
            dependencies: [
                "SWR", "PhalanxLayers", "PhalanxModels", "PhalanxTraining", "PhalanxRuntime", "PhalanxCUDA", "PhalanxCUDAChecks",
                "CPhalanxIntrinsics", .target(name: "CBLAS", condition: .when(platforms: [.linux])),
            ], swiftSettings: cpuFlags),
        .executableTarget(
            name: "phalanx",
            dependencies: [
                "SWR", "Checkpoint", "PhalanxBench", "PhalanxCUDA", "PhalanxLayers", "PhalanxModels", "PhalanxTraining", "PhalanxData", "PhalanxDistributed",
                "PhalanxRuntime", .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: cpuFlags),
        // What every test target shares: named tolerances, `expectClose`, finite differences,
        // seeded random data (from the library's `SeededGenerator`).
        .target(
            name: "PhalanxTestSupport", dependencies: ["PhalanxLayers", "PhalanxRuntime"],
            path: "Tests/TestSupport", swiftSettings: cpuFlags),
        .testTarget(
            name: "SWRTests", dependencies: ["SWR", "Checkpoint", "PhalanxRuntime", "PhalanxTestSupport"],
            resources: [.copy("Fixtures")], swiftSettings: cpuFlags),
        .testTarget(name: "PhalanxBenchTests", dependencies: ["PhalanxBench"], swiftSettings: cpuFlags),
        .testTarget(name: "CheckpointTests", dependencies: ["Checkpoint", "PhalanxRuntime"], swiftSettings: cpuFlags),
        .testTarget(name: "PhalanxCUDATests", dependencies: ["PhalanxCUDA", "PhalanxCUDAChecks", "SWR", "PhalanxLayers", "PhalanxRuntime"], swiftSettings: cpuFlags),
        // A C function with ncclCommInitRank's signature, to check the by-value id through CNCCL's types.
        .target(name: "CNCCLTestDouble", dependencies: ["CNCCL"], path: "Tests/CNCCLTestDouble"),
        .testTarget(
            name: "PhalanxDistributedTests",
            dependencies: ["PhalanxDistributed", "PhalanxCUDA", "PhalanxLayers", "PhalanxRuntime", "CNCCL", "CNCCLTestDouble"],
            swiftSettings: cpuFlags),
        .testTarget(name: "PhalanxDataTests", dependencies: ["PhalanxData", "PhalanxRuntime", "PhalanxTestSupport"], swiftSettings: cpuFlags),
        .testTarget(
            name: "PhalanxModelsTests",
            dependencies: [
                "PhalanxModels", "PhalanxTraining", "PhalanxData", "PhalanxDistributed", "PhalanxLayers", "PhalanxRuntime", "Checkpoint",
                "PhalanxTestSupport", "PhalanxCUDA",
            ],
            swiftSettings: cpuFlags),
        .testTarget(
            name: "PhalanxLayersTests", dependencies: ["PhalanxLayers", "PhalanxRuntime", "SWR", "Checkpoint", "PhalanxTestSupport"],
            resources: [.copy("Fixtures")], swiftSettings: cpuFlags),
    ]
)
