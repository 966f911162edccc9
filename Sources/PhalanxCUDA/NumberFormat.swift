/// How numbers are stored in device memory: float32, or bfloat16 (the upper half of a float32,
/// rounded to nearest even). Arithmetic is float32 in both; one enum for every kernel, buffer
/// and matrix product of the backend.
public enum NumberFormat: String, Sendable, CaseIterable, CustomStringConvertible {
    case float32, bfloat16

    /// `bf16`/`bfloat16` or `f32`/`float32`, as the command line spells them.
    public init?(name: String) {
        switch name {
        case "bf16", "bfloat16": self = .bfloat16
        case "f32", "float32": self = .float32
        default: return nil
        }
    }

    /// Bytes per number.
    public var byteCount: Int { self == .float32 ? 4 : 2 }
    /// `f32` or `bf16`.
    public var description: String { self == .float32 ? "f32" : "bf16" }
    /// CUDA's `cudaDataType_t` code of the format, as cuBLAS takes it (`CUDA_R_32F`, `CUDA_R_16BF`).
    public var cudaDataType: Int32 { self == .float32 ? 0 : 14 }
}

extension NumberFormat {
    /// `values` as this storage holds them: rounded once to bfloat16, or unchanged.
    public func rounded(_ values: [Float]) -> [Float] { self == .bfloat16 ? BFloat16.rounded(values) : values }

    /// A device buffer holding `values` in this storage (rounded to bfloat16 if so).
    public func upload(_ values: [Float], context: CUDAContext) throws -> DeviceBuffer {
        let buffer = try DeviceBuffer(context: context, byteCount: values.count * byteCount)
        try write(values, to: buffer)
        return buffer
    }

    /// Copies `values` to the start of `buffer` in this storage (rounded to bfloat16 if so), after
    /// the stream's queued work.
    public func write(_ values: [Float], to buffer: DeviceBuffer) throws {
        switch self {
        case .float32: try buffer.upload(values)
        case .bfloat16: try buffer.upload(BFloat16.bits(values))
        }
    }

    /// The first `count` numbers of `buffer`, stored in this storage, as float32 (waits for the stream).
    public func download(_ buffer: DeviceBuffer, count: Int) throws -> [Float] {
        switch self {
        case .float32: try buffer.floats(count: count)
        case .bfloat16: BFloat16.floats(try buffer.bfloat16(count: count))
        }
    }
}
