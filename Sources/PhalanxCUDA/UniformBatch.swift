import PhalanxRuntime
import SWR

extension SequenceLayout {
    /// Stops with a message naming `function` unless the layout is what the kernels of this
    /// package take (a uniform batch, `SequenceLayout.batched`, head dim 16, counts that fit 32
    /// bits) and each buffer of `context` holds at least its count of numbers in `storage`;
    /// returns the batch shape.
    func checkUniformBatch(_ function: String, context: CUDAContext, storage: NumberFormat,
                           _ buffers: [(String, DeviceBuffer, Int)]) -> (batch: Int, length: Int, heads: Int) {
        require(headDim == JaggedWindow.standardHeadDim, "\(function): the kernels have head dim \(JaggedWindow.standardHeadDim), the layout is \(self)")
        let length = lengths.first ?? 0
        require(starts == (0..<sequenceCount).map { $0 * length } && lengths.allSatisfy { $0 == length },
                "\(function): needs a uniform batch (SequenceLayout.batched), got \(self)")
        require(sequenceCount <= Int(Int32.max) && length <= Int(Int32.max) && heads <= Int(Int32.max) / JaggedWindow.standardHeadDim,
                "\(function): batch, length and heads must fit the kernels' 32-bit counts, got \(self)")
        for (label, buffer, count) in buffers {
            require(buffer.context === context, "\(function): \(label) belongs to another CUDAContext")
            require(buffer.byteCount >= count * storage.byteCount,
                    "\(function): \(label) holds \(buffer.byteCount) bytes, expected \(count) \(storage) numbers (\(count * storage.byteCount) bytes) for \(self)")
        }
        return (sequenceCount, length, heads)
    }
}
