// Types for the XML and XML-RPC codecs of Xen Orchestra (shipped with xen-api, untyped upstream).

declare module '@vates/xml/format' {
  export interface XmlNode {
    name: string;
    attributes?: Record<string, string>;
    children?: (XmlNode | string)[];
  }
  export function formatXml(
    tree: XmlNode,
    options?: { includeDeclaration?: boolean; indent?: number | string },
  ): string;
}

declare module '@vates/xml/parse' {
  import type { XmlNode } from '@vates/xml/format';
  export function parseXml(
    xml: string,
    options?: { normalize?: boolean; strict?: boolean; trim?: boolean },
  ): XmlNode;
}

declare module '@vates/xml-rpc/formatter' {
  import type { XmlNode } from '@vates/xml/format';
  export const xmlRpcFormatter: {
    format_methodCall(call: { methodName: string; params: unknown[] }): XmlNode;
    format_methodResponse(response: { params: unknown[] } | { fault: unknown }): XmlNode;
  };
}

declare module '@vates/xml-rpc/parser' {
  import type { XmlNode } from '@vates/xml/format';
  export const xmlRpcParser: {
    parse(node: XmlNode): unknown;
  };
}
